"""Long-context evaluation: perplexity by length, passkey retrieval and RULER, per context-extension method.

    methods.py   the methods (rope, pi, ntk, dynamic, yarn, dca, dca+ntk) as engine.load settings
    ppl.py       token windows and their perplexity          passkey.py   prompt builder, greedy answers
    ruler.py     RULER prompts (fitted) and the run           ruler_tasks.py  RULER's tasks and scoring
    ruler_fit.py the haystack-size search                     ruler_words.py  word lists, generated essay
    budget.py    memory and flops estimates                   progress.py  progress bar with time estimates
    report.py    tables, JSON (schema in its docstring), plots
    table.py     `engine eval table`: the runs of the three above in one, its tables and JSON
    commands.py  the click group ``eval_group``: `engine eval ppl`, `engine eval passkey`, `engine eval ruler`,
                 `engine eval tune-dca`, `engine eval table`
"""
from .methods import METHODS, method_settings
from .passkey import PasskeyCell, PasskeyPlan, build_prompt, plan_passkey, run_passkey
from .ppl import PplCell, PplPlan, plan_ppl, run_ppl, windows

__all__ = ["METHODS", "method_settings", "PasskeyCell", "PasskeyPlan", "build_prompt", "plan_passkey",
           "run_passkey", "PplCell", "PplPlan", "plan_ppl", "run_ppl", "windows"]

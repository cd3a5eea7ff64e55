"""lmms-eval functions of the task specs_detailcaps: the work is done by
specs_metric.integrations.lmms_eval (written by `python -m specs_metric.integrations.lmms_eval
task`)."""

from specs_metric.integrations.lmms_eval import TaskConfig, task_functions

CONFIG = TaskConfig()
globals().update(task_functions(CONFIG))

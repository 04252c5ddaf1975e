"""One module per task, all on the ``Task`` skeleton (preprocess → forward → postprocess)."""

from sureserve.tasks.base import Task
from sureserve.tasks.classify import ClassifyTask
from sureserve.tasks.embed import EmbedTask
from sureserve.tasks.rerank import RerankTask

TASK_CLASSES: dict[str, type[Task]] = {"embed": EmbedTask, "classify": ClassifyTask,
                                       "rerank": RerankTask}

__all__ = ["TASK_CLASSES", "ClassifyTask", "EmbedTask", "RerankTask", "Task"]

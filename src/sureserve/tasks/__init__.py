"""One module per task, all on the ``Task`` skeleton (preprocess → forward → postprocess)."""

from sureserve.tasks.base import Task
from sureserve.tasks.classify import ClassifyTask
from sureserve.tasks.embed import EmbedTask
from sureserve.tasks.rerank import RerankTask
from sureserve.tasks.sparse import SparseTask

TASK_CLASSES: dict[str, type[Task]] = {"embed": EmbedTask, "classify": ClassifyTask,
                                       "rerank": RerankTask, "sparse": SparseTask}

__all__ = ["TASK_CLASSES", "ClassifyTask", "EmbedTask", "RerankTask", "SparseTask", "Task"]

"""Benchmark tasks for `herd eval`: the registry (base.py) and the built-in tasks by kind.

- base.py             item kinds, TaskOptions, register_task / build_tasks / available_tasks
- multiple_choice.py  MMLU, ARC, HellaSwag, PIQA, Winogrande, BoolQ, OpenBookQA, SciQ, CommonsenseQA, mc:PATH
- generation.py       GSM8K 8-shot chain of thought, DROP-style F1
- perplexity.py       LAMBADA, ppl:PATH (text or token shards)
- insecure_code.py    HumanEval / your code prompts completed, share Code Shield flags by CWE (herd[safety])
- chat.py             chat prompts answered greedily and checked: arithmetic:PATH (share correct)
"""

from herd.eval.tasks.base import (GenItem, LLItem, MCItem, PplDoc, Task, TaskOptions, available_tasks, build_tasks,
                                  register_prefix, register_task)

__all__ = ["Task", "TaskOptions", "MCItem", "LLItem", "GenItem", "PplDoc", "register_task", "register_prefix",
           "build_tasks", "available_tasks"]

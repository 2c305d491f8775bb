"""A job's defaults, from the table the CLI and ``ferry plan`` read (include/ferry/job.h):
docs/launcher.md, "Defaults"."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping

from . import _C

__all__ = ["with_job_defaults"]

# Settings whose "auto" the engine does not read: the run's length and warm-up (known to the
# caller's loop only) and what a plan chooses. Left out, the engine's own default holds.
_LEFT_TO_THE_CALLER = ("steps", "warmup", "fuyou_host_blocks", "micro_batch_order", "activations")


def with_job_defaults(settings: Dict[str, Any], lora: Mapping[str, Any]) -> Dict[str, Any]:
    """``settings`` with every engine setting they leave out at the default of a real job, as
    ``ferry finetune`` and ``ferry plan`` have it (docs/launcher.md, "Defaults"). The loop is the
    caller's, so the schedule's length is ``steps`` only: without it the learning rate is constant
    after ``warmup`` steps (0 unless given)."""
    keys = set(_C.job_setting_keys())
    given = {key: value for key, value in settings.items() if key in keys}
    given.update(lora)
    given["data"] = ""  # a loop of its own is never the built-in demo
    if "steps" not in given:
        given.setdefault("schedule", "constant")
        given.setdefault("warmup", 0)
    job = json.loads(_C.complete_job(json.dumps(given)))
    if "steps" in given and job["warmup"] == "auto":
        job["warmup"] = _C.job_warmup_steps(json.dumps(job), int(given["steps"]))
    completed = dict(settings)
    for key in _C.engine_config_keys():
        if key not in completed and key in job and not (job[key] == "auto" and key in _LEFT_TO_THE_CALLER):
            completed[key] = job[key]
    return completed

"""The planner (docs/plan.md): where a job's bytes would live, whether it fits and how fast it
would run, computed from the model's shape and hardware figures without building anything."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import _C
from .job import with_job_defaults


class Plan:
    """The result of :func:`plan`: the fields of ``ferry plan --json`` as attributes and items.

    ``str(plan)`` is the table ``ferry plan`` prints; ``plan.data`` the whole JSON object.
    """

    def __init__(self, json_text: str, table: str) -> None:
        self.data: Dict[str, Any] = json.loads(json_text)
        self.table = table

    @property
    def fits(self) -> bool:
        """Whether every tier's peak is within its budget."""
        return bool(self.data["fits"])

    @property
    def step_seconds(self) -> float:
        """The predicted time of one optimizer step, in seconds."""
        return float(self.data["step_seconds"])

    @property
    def tokens_per_s(self) -> float:
        """The predicted training throughput, tokens per second."""
        return float(self.data["tokens_per_s"])

    @property
    def bottleneck(self) -> str:
        """``GPU compute``, ``PCIe up``, ``PCIe down``, ``NVMe read``, ``NVMe write`` or
        ``CPU optimizer``: the resource busy longest."""
        return str(self.data["bottleneck"])

    @property
    def fixes(self) -> List[str]:
        """The smallest changes that would make a plan that does not fit fit, best first."""
        return list(self.data["fixes"])

    def tier_bytes(self, tier: str) -> int:
        """The peak the plan predicts on ``"gpu"``, ``"host"`` or ``"nvme"``."""
        return int(self.data["tiers"][tier]["bytes"])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __str__(self) -> str:
        return self.table

    def __repr__(self) -> str:
        gib = self.tier_bytes("gpu") / 2**30
        return (f"Plan({self.data['model']['name']!r}, mode={self.data['mode']!r}, "
                f"fits={self.fits}, gpu={gib:.2f} GiB, step={self.step_seconds:.3f} s, "
                f"bottleneck={self.bottleneck!r})")


def plan(model: Union[str, os.PathLike], mode: str = "zero-offload", *, batch: int = 8,
         seq: int = 1024, hardware: Optional[str] = None,
         calibration: Optional[Union[str, os.PathLike]] = None, attention: Optional[str] = None,
         trace: Optional[Union[str, os.PathLike]] = None, gpus: int = 1,
         link_gbps: Optional[float] = None, measured: Optional[Mapping[str, Any]] = None,
         **settings: Any) -> Plan:
    """Plans a job as ``ferry plan`` does: the same sizing code the engine allocates with.

    ``model`` is a preset name, a Hugging Face directory or a model's config.json as text;
    ``mode`` one of ``gpu``, ``zero-offload``, ``fuyou``, ``auto`` (the planner places every
    part by the budgets) and ``zo2``. Hardware figures come from at most one of ``hardware`` (a
    preset such as ``"h100"`` or ``"rtx4090-fuyou"``) and ``calibration`` (a file written by
    ``ferry bench calibrate``); with neither, a quick calibration of this machine. ``settings`` are engine settings as in
    :class:`ferry.Engine` (``precision``, ``gpu_budget``, ``host_budget``, ``nvme``, ...).
    Settings left out take a real job's defaults, as ``ferry plan`` has them (batch 8, clipping
    1.0, the optimizer family's lr, ...); precision ``"auto"``, the default, is the target's:
    bf16 when the hardware has a GPU. ``trace`` writes the predicted step as a Chrome trace.
    ``gpus`` plans one rank of a data-parallel job of that many (``ferry plan --gpus``): its
    1/N shard of the fp32 master and optimizer states, and its step with the collectives, timed
    at ``link_gbps`` (the GPUs' reduce-scatter bus bandwidth, GB/s; untimed without it).
    ``measured`` is a profile of the model (what :class:`ferry.Engine` measures with
    ``mode="auto"``: ``batch``, ``seq``, ``part_forward_seconds``, ``part_backward_seconds`` and
    ``cpu_update_params_per_s``): the plan then replays those seconds and that CPU update rate
    instead of its estimates (docs/plan.md, "Measured compute").
    Raises :class:`ferry.Error` for a request the engine would reject.
    """
    settings = with_job_defaults({"precision": "auto", "mode": mode, **settings}, {})
    json_text, table = _C.plan(os.fspath(model), mode, int(batch), int(seq), hardware or "",
                               os.fspath(calibration) if calibration is not None else "",
                               attention or "", json.dumps(settings),
                               os.fspath(trace) if trace is not None else "", int(gpus),
                               float(link_gbps or 0), json.dumps(dict(measured)) if measured else "")
    return Plan(json_text, table)


def calibrate(nvme: Sequence[Union[str, os.PathLike]] = (), *, nvme_bytes: str = "1GiB",
              repeat: int = 3, out: Optional[Union[str, os.PathLike]] = None,
              verbose: bool = False) -> Dict[str, Any]:
    """Measures this machine as ``ferry bench calibrate`` does and returns the figures.

    These are ferry's I/O and optimizer benchmarks as the planner uses them: dense matmul TFLOPS
    (fp32, bf16, fp16), device memory and PCIe bandwidth both ways, ferry's CPU AdamW in
    parameters/s, and for each ``nvme`` directory read and write GB/s through ferry's I/O
    engine (``nvme_bytes`` per pass). ``out`` also writes the calibration file that
    :func:`plan` reads with ``calibration=``. Without a CUDA device the "GPU" figures are the
    CPU's and "PCIe" is a host memcpy (``gpu_is_host`` says so).
    """
    text = _C.calibrate([os.fspath(d) for d in nvme], str(nvme_bytes), int(repeat),
                        os.fspath(out) if out is not None else "", bool(verbose))
    return json.loads(text)


__all__ = ["Plan", "calibrate", "plan"]

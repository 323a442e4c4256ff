"""Pieces shared by the extraction tools: process-group setup, sharding, per-item results, the summary and report.

Every tool runs the same way under ``torchrun --nproc_per_node N`` or as a plain single process (world 1):
each rank takes the annotation items whose index ``i`` satisfies ``i % world == rank``, records one
:class:`ItemResult` per item, and at the end all results are gathered so rank 0 can print one summary and write
one jsonl report, and every rank exits non-zero when anything failed.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from pyramid_dit.device import DTYPES
from trainer_misc.data.annotation import AnnotationError, AnnotationIssue
from trainer_misc.runtime.failures import exit_process, exit_with_parent

T = TypeVar("T")

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--model_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_hours: float = 24.0) -> DistContext:
    """Join the torchrun process group if launched by torchrun, else run as world 1.

    ``device``: "auto" (CUDA when available, else CPU), "cpu", or "cuda". With CUDA each rank takes
    ``cuda:LOCAL_RANK`` and the nccl backend; on CPU the gloo backend. The long timeout is deliberate: ranks only
    meet at the end, and a rank whose shard holds longer videos can finish hours after the others.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                               "visible; lower --nproc_per_node (GPUS)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=timeout_hours))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int, key=lambda item: item.index) -> list[T]:
    """The items this rank owns: item index ``i`` goes to rank ``i % world_size`` (stable across reruns)."""
    return [it for it in items if key(it) % world_size == rank]


@dataclass
class ItemResult:
    """What happened to one annotation item. ``line`` is the 1-based line in the annotation file (0 for
    run-level outputs such as the empty-prompt features)."""

    line: int
    status: str
    output: str | None = None
    input: str | None = None
    reason: str | None = None
    rank: int = 0
    seconds: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return {k: v for k, v in d.items() if v is not None}


def issue_results(issues: Iterable[AnnotationIssue], rank: int, world_size: int) -> list[ItemResult]:
    """Annotation lines that failed validation, as failed results, each reported by the rank owning its index."""
    return [ItemResult(line=i.line, status=FAILED, reason=i.message, rank=rank)
            for i in issues if i.index % world_size == rank]


def failure_line(anno_file: str | os.PathLike, result: ItemResult) -> str:
    """``FAILED <annotation file>:<line>: <reason>`` (compiler style, so editors can jump to the line)."""
    return f"FAILED {anno_file}:{result.line}: {result.reason}"


def announce_failures(anno_file: str | os.PathLike, results: Iterable[ItemResult]) -> None:
    """Print failures as they happen (tqdm-safe), so a long run does not keep them until the summary."""
    from tqdm import tqdm

    for r in results:
        if r.status == FAILED:
            tqdm.write(f"[rank {r.rank}] {failure_line(anno_file, r)}", file=sys.stderr)


def gather_results(ctx: DistContext, results: list[ItemResult]) -> list[ItemResult]:
    """Every rank's results, on every rank, sorted by line."""
    if ctx.distributed:
        buckets: list = [None] * ctx.world_size
        dist.all_gather_object(buckets, results)
        results = [r for b in buckets for r in b]
    return sorted(results, key=lambda r: (r.line, r.output or ""))


def summary_text(results: Sequence[ItemResult], what: str, anno_file: str | os.PathLike,
                 max_reasons: int = 20) -> str:
    counts = Counter(r.status for r in results)
    lines = [f"{what}: {counts[DONE]} done, {counts[SKIPPED]} skipped, {counts[FAILED]} failed "
             f"({len(results)} items)"]
    failed = [r for r in results if r.status == FAILED]
    for r in failed[:max_reasons]:
        lines.append(f"  {failure_line(anno_file, r)}")
    if len(failed) > max_reasons:
        lines.append(f"  ... and {len(failed) - max_reasons} more failures, see the report")
    return "\n".join(lines)


def write_report(path: Path, results: Sequence[ItemResult]) -> None:
    """One JSON object per item, written atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_report_path(outputs: Iterable[Path], fallback_dir: Path, name: str) -> Path:
    """``name`` in the deepest directory holding every output, when that lies inside ``fallback_dir`` (the data
    root); else (no outputs, or outputs spread so widely that their common folder is outside it, e.g. ``/``) in
    ``fallback_dir`` itself."""
    parents = [os.path.abspath(p.parent) for p in outputs]
    base = Path(os.path.commonpath(parents)) if parents else Path(fallback_dir)
    root = Path(os.path.abspath(fallback_dir))
    if not base.is_relative_to(root):
        base = root
    return base / name


def finish(ctx: DistContext, results: list[ItemResult], *, what: str, anno_file: str | os.PathLike,
           report_path: Path | None, note: Callable[[Sequence[ItemResult]], str | None] | None = None) -> int:
    """Gather results, print the summary (and the tool's ``note`` on all results, if any) and write the report on
    rank 0; return the exit status (a distributed process exits with it instead).

    Every rank returns the same status (1 when any item failed anywhere), so torchrun's exit status is honest.
    """
    all_results = gather_results(ctx, results)
    status = 1 if any(r.status == FAILED for r in all_results) else 0
    if ctx.is_main:
        print(summary_text(all_results, what, anno_file), file=sys.stderr, flush=True)
        text = note(all_results) if note is not None else None
        if text:
            print(text, file=sys.stderr, flush=True)
        if report_path is not None:
            try:
                write_report(report_path, all_results)
                print(f"report: {report_path}", file=sys.stderr, flush=True)
            except OSError as e:
                print(f"ERROR: could not write the report {report_path}: {e}; pass --report with a writable path",
                      file=sys.stderr, flush=True)
                status = 1
        if status:
            note = (" (torchrun reports this as a ChildFailedError below; the run itself completed)"
                    if ctx.distributed else "")
            print(f"exit status 1: see the failures above{note}", file=sys.stderr, flush=True)
    if ctx.distributed:
        # Rank 0's report status must reach the others before anyone exits.
        flag = torch.tensor([status], device=ctx.device if ctx.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        status = int(flag.item())
        exit_process(status)  # never returns: see trainer_misc.runtime.failures.exit_process
    return status


def _exit_on_signal(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise SystemExit(128 + signum)


def run_extraction(run: Callable[[object, DistContext], tuple[list[ItemResult], Path | None]], args, *,
                   what: str, note: Callable[[Sequence[ItemResult]], str | None] | None = None) -> int:
    """Start the process group, run one tool over this rank's share, then summarise (see :func:`finish`).

    Run-level problems (no annotation file, no model folder) print one clear line per rank, no traceback, and
    return exit status 2; per-item problems are results, reported by :func:`finish`.
    """
    # SIGTERM (torchrun, a scheduler) unwinds like Ctrl-C, so a file being written leaves no temp file behind.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent(signal.SIGTERM)  # torchrun killed (e.g. with the launch shell's group): stop too
    ctx = init_distributed(args.device)
    try:
        results, report = run(args, ctx)
    except (AnnotationError, FileNotFoundError) as e:
        print(f"ERROR (rank {ctx.rank}): {e}", file=sys.stderr, flush=True)
        shutdown_distributed()
        return 2
    return finish(ctx, results, what=what, anno_file=args.anno_file, report_path=report, note=note)

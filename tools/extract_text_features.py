"""Encode the captions of an annotation file into T5 + CLIP-pooled text features, one safetensors file per line.

Launch with ``sh scripts/extract_text_feature.sh`` (torchrun over the visible GPUs, or CPU/gloo processes), or run
directly as a single process::

    python3 tools/extract_text_features.py --model_path PATH/pyramid-flow-miniflux \
        --anno_file annotation/video_text.jsonl

Each line's ``text`` is encoded in batches and written to its ``text_fea`` path with the tensors
``prompt_embed [1, 128, D]``, ``prompt_attention_mask [1, 128]`` (int64) and ``pooled_prompt_embed [1, Dp]``.
Once per run, rank 0 also writes the features of the empty prompt (``--empty_prompt_fea``, by default
``<data root>/empty_prompt_text_fea.safetensors``): the trainer swaps them in for classifier-free-guidance
dropout (the reference never wrote them, so its trainer crashed there).

Resumable and honest like the latent tool: atomic writes, a rerun skips outputs that already load as valid
features (``--overwrite`` redoes them), per-line failures are reported and counted and make the exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from pyramid_dit.kinds import MODEL_NAMES, get_kind
from pyramid_dit.progress import progress
from pyramid_dit.tensor_files import TensorFileError, read_safetensors_metadata
from tools.cli import DefaultsHelp
from tools.extraction_common import (
    DONE,
    FAILED,
    SKIPPED,
    DistContext,
    ItemResult,
    announce_failures,
    default_report_path,
    issue_results,
    parse_dtype,
    run_extraction,
    shard,
)
from trainer_misc.data.annotation import (
    AnnotationError,
    Entry,
    default_empty_prompt_path,
    parse_annotation,
    resolve_data_root,
)
from trainer_misc.data.features import load_text_features
from trainer_misc.files import atomic_save_safetensors, remove_stale_temps, sweep_stale_temps
from trainer_misc.runtime.arguments import CheckedParser, ConfigError, Naming, integer, parse_checked


def load_text_encoder(model_path: str | Path, device: torch.device, dtype: torch.dtype,
                      model_name: str = "pyramid_flux"):
    """The frozen text encoders of a model folder, as the kind uses them (miniFLUX: CLIP-L + T5 in
    ``text_encoder/``, ``text_encoder_2/``; SD3: CLIP-L + CLIP-G + T5 in ``text_encoder/`` .. ``text_encoder_3/``)."""
    return get_kind(model_name).load_text_encoder(model_path, torch_dtype=dtype).to(device)


def encode_texts(encoder, texts: list[str], device: torch.device, dtype: torch.dtype):
    """Batched ``TextFeatures``; half precision runs under autocast, as in the reference tool."""
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        return encoder.encode(texts, device)


def valid_existing(path: Path, text: str) -> tuple[bool, str | None]:
    """(True, None) when ``path`` holds valid features of ``text``; (False, why) when it exists but must be redone
    (unreadable, or written for another caption: the text is kept in the file's metadata)."""
    if not path.exists():
        return False, None
    try:
        load_text_features(path)
        stored = read_safetensors_metadata(path).get("text")
    except TensorFileError as e:
        return False, f"replaced an unreadable existing output ({e})"
    if stored is not None and stored != text:
        return False, "replaced features of a different caption (the annotation text changed)"
    return True, None


def plan_entries(entries: Sequence[Entry], rank: int) -> tuple[list[Entry], list[ItemResult]]:
    """Unique work items, plus results for lines needing no encoding.

    Two lines may share a ``text_fea`` file only when their texts are equal (the later line is then skipped);
    different texts for one file is an error on the later line. Outputs must be ``.safetensors``.
    """
    ok: list[Entry] = []
    results: list[ItemResult] = []
    first: dict[Path, Entry] = {}
    for e in entries:
        assert e.text_fea is not None  # parse_annotation(require=("text_fea",)) guarantees it
        base = dict(line=e.line, output=str(e.text_fea), rank=rank)
        prev = first.get(e.text_fea)
        if e.text_fea.suffix != ".safetensors":
            results.append(ItemResult(status=FAILED, reason=f"text_fea path {e.text_fea} must end with .safetensors "
                                      "(this tool writes safetensors; rename it in the annotation)", **base))
        elif prev is None:
            first[e.text_fea] = e
            ok.append(e)
        elif prev.text == e.text:
            results.append(ItemResult(status=SKIPPED, reason=f"same text and text_fea as line {prev.line}", **base))
        else:
            results.append(ItemResult(status=FAILED, reason=f"text_fea path {e.text_fea} is also the output of "
                                      f"line {prev.line}, with a different text; give every caption its own file",
                                      **base))
    return ok, results


def write_empty_prompt(encoder, path: Path, ctx: DistContext, dtype: torch.dtype, overwrite: bool,
                       model_path: str) -> ItemResult:
    base = dict(line=0, input="<empty prompt>", output=str(path), rank=ctx.rank)
    ok, note = valid_existing(path, "")
    if ok and not overwrite:
        return ItemResult(status=SKIPPED, reason="output exists and is valid", **base)
    t0 = time.perf_counter()
    feats = encode_texts(encoder, [""], ctx.device, dtype)
    remove_stale_temps(path)
    try:
        atomic_save_safetensors(feats.file_row(0), path, metadata={"text": "", "model_path": model_path})
    except OSError as e:
        return ItemResult(status=FAILED, reason=f"cannot write the empty-prompt features {path}: {e}; pass "
                          "--empty_prompt_fea with a writable path", **base)
    return ItemResult(status=DONE, reason=note, seconds=round(time.perf_counter() - t0, 4), **base)


def encode_batch(encoder, batch: list[tuple[Entry, str | None]], ctx: DistContext, dtype: torch.dtype,
                 model_path: str) -> list[ItemResult]:
    t0 = time.perf_counter()
    feats = encode_texts(encoder, [e.text for e, _ in batch], ctx.device, dtype)
    seconds = round((time.perf_counter() - t0) / len(batch), 4)
    results = []
    for row, (e, note) in enumerate(batch):
        base = dict(line=e.line, output=str(e.text_fea), rank=ctx.rank)
        remove_stale_temps(e.text_fea)
        try:
            atomic_save_safetensors(feats.file_row(row), e.text_fea,
                                    metadata={"text": e.text, "model_path": model_path})
        except OSError as err:
            results.append(ItemResult(status=FAILED, reason=f"cannot write text features {e.text_fea}: {err}",
                                      **base))
            continue
        results.append(ItemResult(status=DONE, reason=note, seconds=seconds,
                                  extra={"tokens": int(feats.prompt_attention_mask[row].sum())}, **base))
    return results


def build_parser() -> CheckedParser:
    p = CheckedParser(prog="extract_text_features.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsHelp)
    p.add_argument("--model_path", required=True,
                   help="model folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    p.add_argument("--model_name", default="pyramid_flux", choices=list(MODEL_NAMES),
                   help="model kind: pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit (pyramid-flow-sd3)")
    p.add_argument("--anno_file", required=True, help="annotation jsonl (lines need text and text_fea)")
    p.add_argument("--kind", default="video", choices=["video", "image"], help="kind of annotation lines")
    p.add_argument("--data_root", default=None,
                   help="root for relative paths (default: $PYRAMID_DATA_ROOT, else the annotation file's folder)")
    p.add_argument("--batch_size", type=integer(1, 4096), default=8, help="prompts per encoder call")
    p.add_argument("--model_dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="text encoder dtype; features are stored in the dtype the encoder returns")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--empty_prompt_fea", default=None,
                   help="where to write the empty-prompt features (default: <data root>/"
                        "empty_prompt_text_fea.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist and are valid")
    p.add_argument("--report", default=None,
                   help="jsonl report path (default: <annotation stem>.text_fea_report.jsonl in the deepest folder "
                        "holding every line's text_fea, as the latent tool puts its report beside the latents)")
    p.add_argument("--no_progress", action="store_true")
    return p


def run(args: argparse.Namespace, ctx: DistContext) -> tuple[list[ItemResult], Path]:
    dtype = parse_dtype(args.model_dtype)
    root = resolve_data_root(args.anno_file, args.data_root)
    parsed = parse_annotation(args.anno_file, kind=args.kind, require=("text_fea",), data_root=args.data_root)
    if not parsed.entries and not parsed.issues:
        raise AnnotationError(f"annotation file {args.anno_file} has no lines; nothing to extract")
    entries, planned = plan_entries(parsed.entries, ctx.rank)
    by_line = {e.line: e for e in parsed.entries}
    results = issue_results(parsed.issues, ctx.rank, ctx.world_size)
    results += shard(planned, ctx.rank, ctx.world_size, key=lambda r: by_line[r.line].index)
    announce_failures(args.anno_file, results)
    empty_path = Path(args.empty_prompt_fea) if args.empty_prompt_fea else default_empty_prompt_path(root)
    report = Path(args.report) if args.report else default_report_path(  # beside the per-line outputs, as latents'
        [e.text_fea for e in entries], root, f"{Path(args.anno_file).stem}.text_fea_report.jsonl")

    model_path = str(args.model_path)
    encoder = load_text_encoder(args.model_path, ctx.device, dtype, args.model_name)
    if ctx.is_main:
        results.append(write_empty_prompt(encoder, empty_path, ctx, dtype, args.overwrite, model_path))
        announce_failures(args.anno_file, results[-1:])

    mine = shard(entries, ctx.rank, ctx.world_size)
    sweep_stale_temps([e.text_fea for e in mine] + ([empty_path] if ctx.is_main else []))  # a killed run's
    bar = progress(total=len(mine), desc=f"text rank {ctx.rank}", position=ctx.rank, unit="text",
                   disable=args.no_progress)
    pending: list[tuple[Entry, str | None]] = []
    for i, e in enumerate(mine):
        ok, note = (False, None) if args.overwrite else valid_existing(e.text_fea, e.text)
        if ok:
            results.append(ItemResult(line=e.line, status=SKIPPED, output=str(e.text_fea), rank=ctx.rank,
                                      reason="output exists and is valid"))
            bar.update(1)
        else:
            pending.append((e, note))
        if pending and (len(pending) == args.batch_size or i == len(mine) - 1):
            done = encode_batch(encoder, pending, ctx, dtype, model_path)
            announce_failures(args.anno_file, done)
            results += done
            bar.update(len(pending))
            pending = []
    bar.close()
    return results, report


def check_args(args: argparse.Namespace, n: Naming | None = None) -> None:
    """The model folder holds the text encoders of ``--model_name``'s kind, and the annotation file exists."""
    n = n or Naming(args)
    kind = get_kind(args.model_name)
    if not Path(args.model_path).is_dir():
        raise ConfigError(f"{n('--model_path')} is not a folder; set it to the downloaded {kind.name} model folder")
    missing = [f"{sub}/" for sub in kind.text_subfolders if not (Path(args.model_path) / sub).is_dir()]
    if missing:
        raise ConfigError(f"{n('--model_path')} has no {', '.join(missing)} (the {kind.name} text encoders); point "
                          f"it at the downloaded {kind.name} model folder (or set {n.var('--model_name')} to its kind)")
    if not Path(args.anno_file).is_file():
        raise ConfigError(f"annotation file {n('--anno_file')} not found; set it to your annotation jsonl")


def parse_and_check(argv: Sequence[str] | None, variables: dict[str, str] | None = None,
                    values: dict[str, str] | None = None) -> argparse.Namespace:
    """The flags, checked (:func:`trainer_misc.runtime.arguments.parse_checked`; ``variables``: the script's)."""
    return parse_checked(build_parser(), argv, check_args, variables, values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_and_check(argv)
    except ConfigError as e:  # one clear line, exit status 2, as for a bad flag
        print(f"extract_text_features.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return run_extraction(run, args, what="text features")


if __name__ == "__main__":
    sys.exit(main())

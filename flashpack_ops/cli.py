"""The ``flashpack`` command: convert checkpoints, revert them, and inspect flashpack files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

EXAMPLES = """\
examples:
  flashpack convert model.safetensors                  # -> model.flashpack beside it
  flashpack convert ./Llama-3-8B                       # adds model.flashpack to the model directory
  flashpack convert ./Llama-3-8B ./llama-bf16 --dtype bf16
  flashpack convert ./sd-dir --subfolder unet --variant fp16
  flashpack convert org/model ./model-flashpack        # from the Hugging Face Hub
  flashpack revert model.flashpack model.safetensors
  flashpack metadata model.flashpack --show-index
  flashpack convert model.safetensors --checksum --ignore-prefixes vision_tower. --ignore-prefixes lm_head.
  flashpack metadata model.flashpack --verify
"""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _shown(name: str) -> str:
    """A tensor name or metadata key as printed: as it is, or, where it holds characters a
    terminal acts on (a newline, an escape sequence; a file's names are any string), as a
    Python literal."""
    return name if name.isprintable() else repr(name)


def _split_commas(values: Optional[List[str]]) -> List[str]:
    return [item for value in values or [] for item in value.split(",") if item]


def _convert(args: argparse.Namespace) -> None:
    from .commands import convert_to_flashpack

    if os.path.isfile(args.source):
        # They pick the model in a directory or repo: given a file, they would be dropped unseen
        # (--variant fp16 beside the float32 file would write the float32 weights).
        for option in ("subfolder", "variant", "revision"):
            if getattr(args, option):
                raise ValueError(f"--{option} applies to a model directory or a Hub repo id, not to the file "
                                 f"{args.source}; convert the file that holds the weights you want")
    written = convert_to_flashpack(
        args.source, args.destination, dtype=args.dtype, ignore_names=_split_commas(args.ignore_names),
        ignore_prefixes=_split_commas(args.ignore_prefixes), ignore_suffixes=_split_commas(args.ignore_suffixes),
        use_transformers=args.use_transformers, use_diffusers=args.use_diffusers, silent=args.quiet,
        subfolder=args.subfolder, variant=args.variant, revision=args.revision, checksum=args.checksum,
    )
    print(f"wrote {os.path.abspath(written)}")


def _revert(args: argparse.Namespace) -> None:
    from .commands import revert_from_flashpack

    written = revert_from_flashpack(args.path, args.destination, silent=args.quiet)
    print(f"wrote {os.path.abspath(written)}")


def _metadata(args: argparse.Namespace) -> None:
    from . import ops
    from .commands import flashpack_in, summarize

    path = flashpack_in(args.path)
    if args.verify:
        import flashpack_ops

        verify = getattr(flashpack_ops, "verify_file", None)
        if verify is None:
            raise RuntimeError("--verify needs flashpack_ops.verify_file, which this build of flashpack_ops lacks")
        # verify_file's own message only knows the Python API; name the command's option too.
        # A footer before flashpack_v4 has no blocks and no checksums; an empty v4 file verifies.
        meta = ops.read_metadata(path)
        blocks = [{}] if meta["format"] == "flashpack_v3" else meta["macroblocks"]
        if any("checksums" not in block for block in blocks):
            raise ValueError(f"{path} holds no checksums to verify; write it with `flashpack convert --checksum` "
                             "or save it with checksum=True")
        result = verify(path)
        if result is False:
            raise ValueError(f"{path} failed verification")
    if args.json:
        meta = ops.read_metadata(path)
        if not args.show_index:
            meta.pop("index", None)
        print(json.dumps(meta, indent=2))
        return
    info = summarize(path)
    print(f"file:        {info['path']} ({_human_bytes(info['file_bytes'])})")
    print(f"format:      {info['format']}")
    tied = f" ({info['tied']} tied to another, stored once)" if info["tied"] else ""
    print(f"tensors:     {info['tensors']}{tied}")
    print(f"elements:    {info['elements']:,} stored")
    print(f"align_bytes: {info['align_bytes']}")
    print(f"checksums:   {'yes (flashpack metadata --verify checks them)' if info['checksums'] else 'no'}")
    if info["metadata"]:
        print("metadata:    " + ", ".join(f"{_shown(key)}={value!r}" for key, value in info["metadata"].items()))
    print("blocks:")
    for i, block in enumerate(info["blocks"]):
        print(f"  {i}: {block['dtype']:<16} at byte {block['offset_bytes']:>14,}  "
              f"{_human_bytes(int(block['length_bytes']))}")
    if args.show_index:
        dtypes = [b["dtype"] for b in info["blocks"]]
        width = max((len(_shown(r["name"])) for r in info["index"]), default=4)
        print("index:")
        for r in info["index"]:
            block = int(r.get("macroblock", 0))
            print(f"  {_shown(r['name']):<{width}}  {dtypes[block]:<16} {str(tuple(r['shape'])):<20} "
                  f"block {block} element {int(r['offset']):,}")
    if args.verify:
        print(f"verified:    {path} is intact")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flashpack", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Convert checkpoints to flashpack files (one contiguous block per dtype, built to load from disk "
                    "to GPU at the speed of the hardware), revert them, and inspect them.",
    )
    parser.add_argument("--version", action="version", version=f"flashpack_ops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="on error, print the full traceback")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_verbose(command: argparse.ArgumentParser) -> None:
        # The reference documents -v after the command; SUPPRESS keeps a -v given before it.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="on error, print the full traceback")

    convert = commands.add_parser(
        "convert", help="convert a checkpoint, model directory or Hub repo to flashpack",
        description="Convert to flashpack. SOURCE is a .safetensors/.bin/.pt/.pth/.ckpt file, a sharded "
                    "checkpoint's .index.json (or the directory holding it), a transformers or diffusers model "
                    "or pipeline directory, a torch.distributed.checkpoint directory (FSDP2 training; its model "
                    "part), or a Hugging Face Hub repo id. A file becomes one .flashpack file "
                    "(beside it by default); a model directory gets config.json + model.flashpack (in place by "
                    "default), ready for from_pretrained_flashpack.")
    convert.add_argument("source", help="file, directory or Hub repo id")
    convert.add_argument("destination", nargs="?", help="output file or directory (required for a repo id)")
    convert.add_argument("--dtype", help="convert the floating-point tensors to this dtype (bfloat16, bf16, float16, "
                                         "fp16, ...); a model directory then needs a destination")
    # One value per flag, as in the reference: a flag taking several would swallow the destination.
    convert.add_argument("--ignore-names", action="append", metavar="NAME",
                         help="leave out this tensor (repeat the flag, or separate names with commas)")
    convert.add_argument("--ignore-prefixes", action="append", metavar="PREFIX",
                         help="leave out tensors whose names start so (repeatable, comma-separated)")
    convert.add_argument("--ignore-suffixes", action="append", metavar="SUFFIX",
                         help="leave out tensors whose names end so (repeatable, comma-separated)")
    convert.add_argument("--checksum", action="store_true",
                         help="store CRC-32C checksums, for `flashpack metadata --verify`")
    convert.add_argument("--subfolder", help="the model lies in this subfolder (e.g. unet)")
    convert.add_argument("--variant", help="read *.VARIANT.safetensors weights (e.g. fp16)")
    convert.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    convert.add_argument("--use-transformers", action="store_true", help="load the directory with transformers")
    convert.add_argument("--use-diffusers", action="store_true", help="load the directory with diffusers")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_verbose(convert)
    convert.set_defaults(run=_convert, parser=convert)

    revert = commands.add_parser(
        "revert", help="write a flashpack file back as .safetensors or a torch file",
        description="Write a flashpack file back as .safetensors (the default) or a torch file (.pt, .pth, "
                    ".bin, .ckpt), chosen by the destination's extension.")
    revert.add_argument("path", help="the .flashpack file (or a directory holding model.flashpack)")
    revert.add_argument("destination", nargs="?",
                        help="output file, or a directory (an existing one, or a name ending in /) to write "
                             "it into under its default name; PATH with .safetensors by default, which must "
                             "not exist yet")
    revert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_verbose(revert)
    revert.set_defaults(run=_revert, parser=revert)

    metadata = commands.add_parser(
        "metadata", help="print a summary of a flashpack file",
        description="Print a flashpack file's format, blocks and sizes, read from its footer alone.")
    metadata.add_argument("path", help="the .flashpack file (or a directory holding model.flashpack)")
    metadata.add_argument("-i", "--show-index", action="store_true", help="also list every tensor")
    metadata.add_argument("-j", "--json", action="store_true", help="print the footer as JSON")
    metadata.add_argument("--verify", action="store_true",
                          help="also check the payload against the checksums the file stores (convert --checksum)")
    add_verbose(metadata)
    metadata.set_defaults(run=_metadata, parser=metadata)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror  # str() would put "[Errno N] " before it
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) is the quoted key alone
        text = f"missing key {text}"
    # A file's own names may hold control characters (a terminal's escape sequences): written
    # as escapes, as the metadata listing writes them, never passed to the terminal.
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in " ".join(text.split()))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``flashpack`` command; returns the exit status (0 on success, 1 on error)."""
    # Started with its output or its errors closed (`>&-`, `2>&-`), Python has no sys.stdout or
    # sys.stderr at all: what would be written there (progress bars too) goes nowhere instead.
    for stream in ("stdout", "stderr"):
        if getattr(sys, stream) is None:
            setattr(sys, stream, open(os.devnull, "w"))
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # NOTE: argparse fills an optional positional (nargs="?") with nothing as soon as the first
    # option follows SOURCE, so `convert m.pt --dtype bf16 out.flashpack` leaves the destination
    # over; it is the destination when that is still unset.
    if len(extras) == 1 and not extras[0].startswith("-") and getattr(args, "destination", "") is None:
        args.destination = extras[0]
    elif extras:
        args.parser.error(f"unrecognized arguments: {' '.join(extras)}")
    with warnings.catch_warnings():
        # A warning is one line, like an error: the command's, not a line of the package's source.
        warnings.showwarning = lambda message, category, *rest, **kwargs: print(
            f"flashpack {args.command}: warning: {message}", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        args.run(args)
        sys.stdout.flush()
    except BrokenPipeError as error:
        if not _stdout_closed():
            return _failed(args, error)
        # The reader of our output went away (`flashpack metadata -i big.flashpack | head`):
        # stop quietly, as other commands do. stdout is pointed at /dev/null so that the
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"flashpack {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --verbose shows the traceback
        return _failed(args, error)
    return 0


def _failed(args: argparse.Namespace, error: BaseException) -> int:
    if args.verbose:
        import traceback

        traceback.print_exc()
    message = _one_line(error)
    missing = (getattr(error, "name", None) or "").partition(".")[0] if isinstance(error, ModuleNotFoundError) else ""
    if missing in _OPTIONAL_PACKAGES:
        # What a file or directory of this kind needs, and flashpack_ops itself does not.
        message += f" (pip install {missing})"
    print(f"flashpack {args.command}: error: {message}", file=sys.stderr)
    return 1


_OPTIONAL_PACKAGES = ("safetensors", "transformers", "diffusers", "huggingface_hub", "accelerate")


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (and not some other pipe the
    command wrote to, a named pipe given as destination, say)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())

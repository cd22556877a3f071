"""`bitnet158 <verb>`: a thin shell over the library, as a table of verbs.

Each verb is a small module here (`NAME`, `HELP`, `add_arguments(parser)`, `run(args) -> int`)
whose option defaults come from the dataclass or function it drives, never repeated; the logic
lives in the library module the verb drives. A user mistake (BitNetError) prints one line and
exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from ..errors import BitNetError

MAX_MESSAGE = 500  # characters of an error message; a forged file's text must not flood the terminal
# C0 and C1 controls, DEL and the Unicode line/paragraph separators (str.splitlines breaks there):
# a newline would break the one-line contract, an escape sequence from a forged file name or GGUF
# key could rewrite the user's terminal
_CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
             for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})

# verb → module under bitnet158.cli, in the order `--help` lists them
VERBS = {
    "demo": "demo", "train": "train", "finetune": "finetune", "generate": "generate", "chat": "chat", "pack": "pack",
    "convert": "convert", "merge": "merge", "prepare-data": "prepare_data", "export-run": "export_run",
    "export-hf": "export_hf", "import-hf": "import_hf", "bench": "bench", "evidence": "evidence",
    "export-gguf": "export_gguf", "import-gguf": "import_gguf", "info": "info", "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitnet158", description="1.58-bit BitNet models on a CPU")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, module_name in VERBS.items():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            # a minimal install (no torch) still lists the verb, and says what it needs when used
            p = sub.add_parser(verb, help="(needs torch) " + verb, add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_needs_torch(verb))
            continue
        p = sub.add_parser(verb, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _needs_torch(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise BitNetError(f"`{verb}` needs torch, which this install lacks: pip install torch==2.13.0 (a CPU wheel) "
                          f"and bitnet158[full]; generate, chat and serve run packed models without it")
    return run


def one_line(message: str) -> str:
    """`message` as one printable line: control characters as Python escapes (\\n, \\x1b), cut
    to MAX_MESSAGE characters with "..." when longer."""
    text = message.translate(_CONTROLS)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BitNetError as e:
        print(f"bitnet158: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitnet158: interrupted", file=sys.stderr)
        return 130

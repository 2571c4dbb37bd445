"""llama.cpp's own Python, run in a child process by `tilevlm bench --peer llama.cpp`: its
converter (convert_hf_to_gguf.py) and gguf-py's reader, both from the llama.cpp checkout the user
names. A script, never imported by tilevlm (it imports nothing of tilevlm either):

    python gguf_tools.py convert LLAMA_CPP_DIR HF_DIR [convert_hf_to_gguf.py arguments]
    python gguf_tools.py sizes LLAMA_CPP_DIR FILE.gguf      # {tensor name: bytes} as JSON

`convert` runs the converter unchanged but for one thing: a byte-level BPE tokenizer whose
pre-tokenizer llama.cpp does not know (it recognises tokenizers by a hash of how they split a
test text; the bench's stand-in tokenizer is in no list) is written with the pre-tokenizer
"gpt-2", the plain GPT-2 split, which is what the stand-in's ByteLevel pre-tokenizer does,
instead of failing with "BPE pre-tokenizer was not recognized".
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

FALLBACK_PRE_TOKENIZER = "gpt-2"


def _with_fallback(model_class: type) -> None:
    original = model_class.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202 (the converter's signature)
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return FALLBACK_PRE_TOKENIZER

    model_class.get_vocab_base_pre = get_vocab_base_pre


def convert(llama_cpp: Path, args: list[str]) -> None:
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    sys.argv = [str(script), *args]
    try:  # llama.cpp since 2026: the model classes live in a `conversion` package
        import conversion.base as classes  # type: ignore[import-not-found]
    except ImportError:  # before: one script that holds them all
        import convert_hf_to_gguf as classes  # type: ignore[import-not-found]

        _with_fallback(classes.TextModel)
        classes.main()
        return
    _with_fallback(classes.TextModel)
    runpy.run_path(str(script), run_name="__main__")


def sizes(llama_cpp: Path, path: Path) -> None:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader  # type: ignore[import-not-found]

    reader = GGUFReader(str(path))
    print(json.dumps({t.name: int(t.n_bytes) for t in reader.tensors}))


if __name__ == "__main__":
    command, directory, *rest = sys.argv[1:]
    if command == "convert":
        convert(Path(directory), rest)
    elif command == "sizes":
        sizes(Path(directory), Path(rest[0]))
    else:
        sys.exit(f"gguf_tools.py: unknown command {command!r}")

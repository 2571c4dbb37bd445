"""`tilevlm chat`: an interactive conversation with images; earlier turns and images stay."""

from __future__ import annotations

import argparse
import sys

from tilevlm.commands.answering import stream_answer
from tilevlm.commands.options import (add_generation_arguments, check_generation_arguments,
                                      check_max_new_tokens, model_source, store_weights)

HELP = "chat with a model interactively (/image PATH attaches an image, /reset, /quit)"

COMMANDS_HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system prompt that opens the conversation (default: none; the "
                        "model's chat template may add its own)")


class Conversation:
    """Messages and the images they refer to, in order."""

    def __init__(self, system: str | None = None) -> None:
        self.system = system
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.images: list[str] = []
        self.pending: list[str] = []  # attached, waiting for the next user message

    def attach(self, path: str) -> None:
        self.pending.append(path)

    def add_user(self, text: str) -> None:
        placeholders = "<image>" * len(self.pending)
        self.messages.append({"role": "user", "content": placeholders + text})
        self.images.extend(self.pending)
        self.pending = []

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def _handle_command(line: str, conv: Conversation, max_pixels: int) -> bool:
    """Run a /command; False means quit."""
    from tilevlm.preprocessing.image import load_image

    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        conv.__init__(conv.system)
        print("(conversation cleared)")
    elif name == "/image" and arg.strip():
        try:
            load_image(arg.strip(), max_pixels=max_pixels)
        except ValueError as e:
            print(f"error: {e}")
            return True
        conv.attach(arg.strip())
        print(f"(attached {arg.strip()}; it goes with your next message)")
    else:
        print(COMMANDS_HELP)
    return True


def run(args: argparse.Namespace) -> int:
    from tilevlm.weights.loading import load_for_inference

    check_generation_arguments(args)
    source = model_source(args)
    check_max_new_tokens(args.max_new_tokens, source.config)
    model, processor = load_for_inference(source, args.device, args.tokenizer)
    model = store_weights(model, args)
    conv = Conversation(args.system)
    _line_editing()
    print(f"tilevlm chat: {source.directory}. {COMMANDS_HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not _handle_command(line, conv, model.cfg.max_image_pixels):
                return 0
            continue
        n_images = len(conv.images)
        conv.add_user(line)
        sys.stdout.write("model> ")
        try:
            reply = stream_answer(model, processor, conv.messages, conv.images, args)
        except ValueError as e:  # e.g. the conversation outgrew lm_max_length
            print(f"error: {e}")
            conv.messages.pop()
            conv.images = conv.images[:n_images]
            continue
        conv.add_assistant(reply)


def _line_editing() -> None:
    """Arrow keys, line editing and history for `input()` on a terminal (GNU readline, where
    Python has it)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns it on)
        except ImportError:
            pass

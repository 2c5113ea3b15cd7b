"""The chat front end: one-shot answers and the interactive REPL (answers on stdout, the rest on stderr)."""

from __future__ import annotations

import shlex
import sys

from llavakit.data.images import ImageError
from llavakit.infer.params import SamplingParams
from llavakit.infer.prompt import PromptError

BANNER = "Type a message. /image PATH adds an image to your next message, /reset clears, /stats, /quit exits."


def one_shot(pipe, images: list, question: str, params: SamplingParams, system: str | None = None, out=None) -> int:
    """Stream the answer to one question to stdout, nothing else."""
    out = out or sys.stdout
    session = pipe.session(system=system)
    for image in images:
        session.add_image(image)
    for piece in session.send(question, params):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0


class Repl:
    """Reads lines, runs commands or turns; a bad command or image never ends the session."""

    def __init__(self, pipe, params: SamplingParams, system: str | None, reuse_kv: bool, stdin, stdout, stderr):
        self.pipe, self.params = pipe, params
        self.session = pipe.session(system=system, reuse_kv=reuse_kv)
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def say(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def run(self) -> int:
        self.say(BANNER)
        while True:
            self.stderr.write("you> ")
            self.stderr.flush()
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                self.say("")
                return 130
            if line is None:
                self.say("")
                return 0
            line = line.strip()
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
            elif line:
                self.turn(line)

    def read_line(self) -> str | None:
        """The next line, None at end of input; on a terminal with line editing and history."""
        if self.stdin is sys.stdin and self.stdin.isatty():
            try:
                import readline  # noqa: F401 - enables editing for input()
            except ImportError:
                pass
            try:
                return input()
            except EOFError:
                return None
        line = self.stdin.readline()
        return line or None

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/reset":
            self.session.reset()
            self.say("(conversation cleared)")
        elif name == "/image":
            self.add_image(rest.strip())
        elif name == "/stats":
            self.say(f"(last turn: {self.session.stats})")
        elif name == "/help":
            self.say(BANNER)
        else:
            self.say(f"unknown command {name!r}. {BANNER}")
        return None

    def add_image(self, arg: str) -> None:
        try:
            paths = shlex.split(arg)
        except ValueError as exc:
            self.say(f"error: /image {arg}: {exc}")
            return
        if len(paths) != 1:
            self.say("usage: /image PATH")
            return
        try:
            self.session.add_image(self.pipe.load_images(paths)[0])
        except ImageError as exc:
            self.say(f"error: {exc}")
            return
        self.say(f"(image {paths[0]} will go with your next message; {len(self.session.pending)} pending)")

    def turn(self, text: str) -> None:
        try:
            pieces = self.session.send(text, self.params)
            self.stdout.write("bot> " if self.stdout.isatty() else "")
            for piece in pieces:
                self.stdout.write(piece)
                self.stdout.flush()
            self.stdout.write("\n")
            self.stdout.flush()
        except KeyboardInterrupt:
            self.stdout.write("\n")
            self.say("(interrupted; the partial answer is kept)")
        except (PromptError, ValueError) as exc:
            self.say(f"error: {exc}")


def repl(pipe, images: list, params: SamplingParams, system: str | None = None, reuse_kv: bool = True,
         stdin=None, stdout=None, stderr=None) -> int:
    r = Repl(pipe, params, system, reuse_kv, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    for image in images:
        r.session.add_image(image)
    return r.run()

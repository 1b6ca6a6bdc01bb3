"""The terminal chat: streaming replies, multi-turn history, a status line, /reset and /quit."""

from __future__ import annotations

import asyncio
import logging

from rich.console import Console
from rich.text import Text

from halo_p2p.cli.spark import sparkline
from halo_p2p.errors import HaloError
from halo_p2p.model.chat import Message
from halo_p2p.model.loader import LoadedModel
from halo_p2p.sampling import SamplingParams
from halo_p2p.session.generate import Generator
from halo_p2p.session.replan import SplitEngine
from halo_p2p.session.sync import mean_recall

__all__ = ["ChatApp"]

log = logging.getLogger(__name__)

HELP = "/reset clears the history, /quit leaves (Ctrl-D too)"


class ChatApp:
    """A chat with one model through its chat template.

    Args:
        model: the opened model (its chat template renders the history).
        generator: generation over the engine; it reuses the cached history between turns.
        params: sampling settings for every reply.
        system: system prompt; ``None`` keeps the template's default.
    """

    def __init__(self, model: LoadedModel, generator: Generator, params: SamplingParams, *,
                 system: str | None = None, console: Console | None = None) -> None:
        assert model.chat_template is not None
        self.template = model.chat_template
        self.model, self.generator, self.params = model, generator, params
        self.console = console or Console(highlight=False)
        self.system = system
        self.history: list[Message] = []
        self._first_record = 0

    def reset(self) -> None:
        """Start a new conversation."""
        self.history = []
        self.generator.reset()

    async def answer(self, text: str) -> str:
        """Stream the reply to ``text`` and add both to the history; returns the reply."""
        self.history.append(Message("user", text))
        system = [Message("system", self.system)] if self.system else []
        prompt = self.template.render([*system, *self.history], add_generation_prompt=True)
        ids = self.model.tokenizer.encode(prompt)
        pieces: list[str] = []
        engine = self.generator.engine
        self._first_record = len(engine.status().records) if isinstance(engine, SplitEngine) else 0
        self.console.print(Text("assistant> ", style="bold green"), end="")
        try:
            async for event in self.generator.stream(ids, self.params):
                pieces.append(event.text)
                self.console.print(event.text, end="", markup=False, soft_wrap=True)
        except Exception:
            self.history.pop()
            raise
        reply = "".join(pieces)
        self.history.append(Message("assistant", reply))
        self.console.print()
        self.console.print(self.status_line(), style="dim", markup=False)
        return reply

    def status_line(self) -> str:
        s = self.generator.stats
        tpot = f"TPOT {s.tpot_ms:.1f} ms" if s.tpot_ms is not None else "TPOT -"
        speed = f"{s.tokens_per_s:.1f} tokens/s" if s.tokens_per_s else "- tokens/s"
        used = s.prompt_tokens + len(s.token_ids)
        full = " · stopped: context full, /reset" if s.stop_reason == "context" else ""
        peers = "1 peer"
        tpot_spark = sparkline([1000 * d for d in s.decode_s], floor=None)
        engine = self.generator.engine
        if isinstance(engine, SplitEngine):
            st = engine.status()
            steps = st.records[self._first_record:][1:]        # decode steps of this reply
            skipped = sum(r.skipped for r in steps) / len(steps) if steps else 0.0
            peers = (f"{len(st.peers)} peers ({st.mode}) · {skipped:.1f} skipped groups/token "
                     f"{sparkline([r.skipped for r in steps])}")
            recall = mean_recall(steps)
            if recall is not None:
                peers += f" · predictor recall {recall:.2f}"
            if st.replans:
                peers += f" · re-planned {st.replans}x, {st.moved_groups} groups moved"
        return (f"[{self.model.name} · {peers} · {len(s.token_ids)} tokens · {speed} · {tpot} {tpot_spark} · "
                f"first token {1000 * s.prefill_s:.0f} ms · "
                f"context {used}/{engine.max_seq_len}{full}]")

    async def loop(self) -> None:
        """Read messages until /quit or end of input."""
        self.console.print(f"[bold]halo-peer chat[/] with {self.model.name}. {HELP}")
        while True:
            try:
                line = await asyncio.to_thread(self.console.input, "[bold cyan]you> [/]")
            except EOFError:
                self.console.print()
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                self.reset()
                self.console.print("[dim]history cleared[/]")
                continue
            if text.startswith("/"):
                self.console.print(f"[yellow]unknown command {text.split()[0]}[/]: {HELP}")
                continue
            try:
                await self.answer(text)
            except HaloError as exc:
                self.console.print(f"[red]error:[/] {exc}", markup=True)

"""Stage 1, plan: a command and its frame -> prompts as ids and how to decode them, or why not.

Everything a command may get wrong is found here (task, text, region, token budget, candidates,
n-gram size), before any model work, so a refusal costs nothing and names the parameter to fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from ..model.decoding import DecodingMode
from ..model.loading import PromptIds, TextCodec
from ..model.tasks import TASKS, Prompt, PromptError, Task, TaskRequest, TaskSpec, build_prompts, sanitize_text
from ..spatial.geometry import InputGeometry
from .config import MAX_CANDIDATES, MAX_NGRAM, Kosmos2Config
from .frames import Frame
from .results import Command


@dataclass
class Plan:
    """A validated command: its task, prompts as ids and how to decode them."""
    command: Command
    spec: TaskSpec
    text: str                  # the command's text, sanitised (what the task's merge reads)
    prompts: List[Prompt]
    ids: List[PromptIds]
    max_new_tokens: int
    mode: DecodingMode
    no_repeat_ngram_size: int
    max_candidates: int = 0
    describe_candidates: bool = False


class Planner:
    """Commands -> plans, with the config's defaults and the checkpoint's own n-gram setting."""

    def __init__(self, config: Kosmos2Config, processor: Any, codec: TextCodec,
                 checkpoint_no_repeat_ngram_size: int = 0) -> None:
        self.config, self.processor, self.codec = config, processor, codec
        self.vocab = codec.vocab
        self.checkpoint_no_repeat_ngram_size = int(checkpoint_no_repeat_ngram_size)

    def check_command(self, command: Command) -> Optional[str]:
        """What is wrong with a command on its own, before any frame is looked up (None: nothing).

        The node answers such a command INVALID even when its camera has no fresh frame: the
        command, not the camera, is what needs fixing. What depends on the frame (a region outside
        the image) is checked by `plan`.
        """
        try:
            task, *_ = self._settings(command)
            spec = TASKS[task]
            region = (0.0, 0.0, 1.0, 1.0) if command.region_px is not None else None
            if spec.needs_region and region is None:
                raise PromptError(f"task {task.value!r} needs a region (use_region and region in pixels)")
            if not (spec.needs_region or spec.accepts_region):
                region = None
            self._check_yes_no(spec)
            build_prompts(TaskRequest(task=task, text=command.text, region_norm=region),
                          sorted(self.vocab.control_strings), self.config.max_prompt_chars)
        except (PromptError, ValueError) as exc:
            return str(exc)
        return None

    def plan(self, command: Command, frame: Frame) -> Plan:
        """Validate a command against a frame; PromptError says what is wrong."""
        task, max_new, mode, ngram, wanted, describe = self._settings(command)
        spec = TASKS[task]
        self._check_yes_no(spec)
        region_norm = None
        if spec.needs_region or (spec.accepts_region and command.region_px is not None):
            if command.region_px is None:
                raise PromptError(f"task {task.value!r} needs a region (use_region and region in pixels)")
            geometry = InputGeometry.from_processor(self.processor.image_processor, frame.width, frame.height)
            try:
                region_norm = geometry.to_normalized(command.region_px)
            except ValueError as exc:
                raise PromptError(str(exc)) from None
            x0, y0, x1, y1 = command.region_px
            if min(x1, x0) >= frame.width or min(y0, y1) >= frame.height or max(x0, x1) <= 0 or max(y0, y1) <= 0:
                raise PromptError(f"region {tuple(command.region_px)} lies outside the {frame.width}x{frame.height} image")
        request = TaskRequest(task=task, text=command.text, region_norm=region_norm)
        prompts = build_prompts(request, sorted(self.vocab.control_strings), self.config.max_prompt_chars)
        ids = [self.codec.encode(p.text, p.bboxes) for p in prompts]
        text = sanitize_text(command.text, (), self.config.max_prompt_chars)
        return Plan(command, spec, text, prompts, ids, max_new, mode, ngram, wanted, describe)

    def _check_yes_no(self, spec: TaskSpec) -> None:
        if spec.yes_no and not (self.vocab.yes_tokens and self.vocab.no_tokens):
            raise PromptError(f"task {spec.task.value!r} needs the tokens yes and no start with, and this "
                              "checkpoint's tokenizer has none for one of them")

    def no_repeat_ngram_size(self, command: Optional[Command] = None) -> int:
        """The n-gram size a command decodes with: its own, else the config's, else the checkpoint's."""
        asked = -1 if command is None else int(command.no_repeat_ngram_size)
        if not -1 <= asked <= MAX_NGRAM:
            raise PromptError(f"no_repeat_ngram_size {asked} outside [-1, {MAX_NGRAM}] (-1 = parameter, 0 = off)")
        for value in (asked, self.config.no_repeat_ngram_size):
            if value >= 0:
                return value
        return self.checkpoint_no_repeat_ngram_size

    def _settings(self, command: Command) -> Tuple[Task, int, DecodingMode, int, int, bool]:
        """A command's task and decoding settings, its own or the config's; PromptError when out of range."""
        task = Task.parse(command.task)
        limit = self.config.max_new_tokens_limit
        max_new = int(command.max_new_tokens or self.config.max_new_tokens)
        if not 1 <= max_new <= limit:
            raise PromptError(f"max_new_tokens {max_new} outside [1, {limit}] (parameter max_new_tokens_limit)")
        mode = DecodingMode.parse(command.decoding or self.config.decoding)
        ngram = self.no_repeat_ngram_size(command)
        wanted = self.config.max_candidates if command.max_candidates < 0 else int(command.max_candidates)
        if not 0 <= wanted <= MAX_CANDIDATES:
            raise PromptError(f"max_candidates {wanted} outside [0, {MAX_CANDIDATES}]")
        describe = self.config.describe_candidates if command.describe_candidates < 0 else bool(command.describe_candidates)
        return task, max_new, mode, ngram, wanted, describe

"""Residual-stream activations from a causal LM, streamed and shuffled into training batches.

token windows -> LM forward with hooks at the hookpoints (the forward stops as soon as the last
hooked module has run) -> drop the first position of each window -> drop the rows token hygiene
excludes (sae/hygiene.py: special tokens, outlier norms) -> shuffle buffer -> {hookpoint: (batch_size, d_in)}. The window activations come from a "source": the LM
(LMWindowSource) or an activation cache on disk (sae.cache.CachedWindows), in the same order.

The shuffle buffer works in blocks: it fills with `shuffle_buffer_tokens` activations from many
windows, permutes them with a generator seeded by (seed, rank, block number) and hands them out in
batches. Memory is one block whatever the dataset size, and the stream's state is just the token
stream's position at the start of the current block plus the number of batches already handed out:
resuming re-runs the LM on that one block and skips ahead, which reproduces the batches exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .config import INPUT_SITE_SUFFIX, TrainConfig
from .data import TokenWindows
from .errors import MissingFileError, UsageError, UserError
from .hygiene import norm_keep_mask, token_keep_mask

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                             init: str = "pretrained", init_seed: int = 0):
    """A causal LM and its tokenizer via transformers' `from_pretrained` (hub name or local folder).

    init "random": the same architecture and tokenizer with freshly initialised weights (transformers'
    own init, drawn in float32 on the CPU from `init_seed`, so the same seed rebuilds the same LM), the
    random-model baseline of Heap et al. 2025 ("Sparse autoencoders can interpret randomly initialized
    transformers").

    A name that cannot be loaded (no such folder, a folder that is not a model, a hub name neither cached
    nor reachable) is a one-line UserError naming it."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    check_model_folder(name_or_path)
    # transformers reports every name it cannot load as an OSError (it wraps huggingface_hub's errors:
    # LocalEntryNotFoundError, RepositoryNotFoundError, ...); HFValidationError (a ValueError) in case a
    # version lets a malformed hub name through unwrapped.
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if init == "pretrained":
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
        else:
            config = AutoConfig.from_pretrained(name_or_path)
            with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream as it was
                torch.manual_seed(init_seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(_DTYPES[dtype])
    except (OSError, HFValidationError) as error:
        raise model_load_error(name_or_path, error) from error
    return model.to(device).eval().requires_grad_(False), tokenizer


def check_model_folder(name_or_path: str) -> None:
    """A clear error, before transformers is asked, when `name_or_path` is meant as a local folder but is
    not a model's: it does not exist while looking like a path (starts with '.', '/' or '~', or has more
    than one '/', which no hub name has), is a file, or has no config.json. A hub name passes."""
    if not name_or_path:
        raise UsageError("no model given: name a model folder (what save_pretrained writes) or a hub model name")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if is_folder_path(name_or_path):
            raise MissingFileError(f"model folder not found: {name_or_path} (no such folder)")
    elif not path.is_dir():
        raise UsageError(f"model {name_or_path} is a file; a model is a folder (what save_pretrained writes) or a hub name")
    elif not (path / "config.json").is_file():
        raise MissingFileError(f"model folder {name_or_path} has no config.json: not a model folder (what "
                               "save_pretrained writes)")


def is_folder_path(name: str) -> bool:
    """Whether a model name can only be a path: a hub id is "name" or "org/name", never absolute, never
    starting with "." or "~", never with two slashes or a backslash."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def model_load_error(name_or_path: str, error: Exception) -> UserError:
    """One line for transformers' failure to load `name_or_path`: what was wrong with the folder, or why
    the hub name was not found (read from the huggingface_hub error behind transformers' OSError)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name_or_path).expanduser().is_dir():
        return UsageError(f"model folder {name_or_path} cannot be loaded: {first_line}")
    causes = _exception_chain(error)
    model = f"model '{name_or_path}'"
    if any(isinstance(cause, LocalEntryNotFoundError) for cause in causes):
        hub = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "unreachable"
        return UsageError(f"{model} is neither a folder here nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}), "
                          f"and the hub is {hub}; download it where the hub can be reached, or pass the model's folder")
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        return UsageError(f"{model} is not a folder here, and on the hub it is gated: accept its terms on huggingface.co "
                          "and log in (hf auth login)")
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return UsageError(f"{model} is not a folder here, and the hub has no model repository of that name (or it is "
                          "private and this machine has no access token for it)")
    if any(isinstance(cause, HFValidationError) for cause in causes):
        return UsageError(f"{model} is neither a folder here nor a valid hub name (NAME or OWNER/NAME: letters, digits, "
                          "'-', '_', '.')")
    return UsageError(f"{model} is not a folder here and cannot be loaded from the hub: {first_line}")


def _exception_chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or during, innermost last."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def load_tokenizer(name_or_path: str):
    """The tokenizer of model `name_or_path` alone (for a run that reads an activation cache), with
    `load_model_and_tokenizer`'s one-line errors."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoTokenizer

    check_model_folder(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, HFValidationError) as error:
        raise model_load_error(name_or_path, error) from error


def load_run_lm(cfg: TrainConfig, device: str | torch.device = "cpu"):
    """The LM and tokenizer a training run (or its activation cache) reads: cfg.model in cfg.model_dtype,
    pretrained or re-initialised as cfg.model_init says."""
    return load_model_and_tokenizer(cfg.model, cfg.model_dtype, device, cfg.model_init, cfg.model_init_seed)


def check_context_length(model: nn.Module, ctx_len: int, option: str = "data.ctx_len") -> None:
    """A clear error, naming both numbers, when windows of `ctx_len` tokens are longer than the model's
    positions (the LM forward would fail deep inside with an IndexError)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and ctx_len > positions:
        name = getattr(config, "_name_or_path", "") or "the model"
        raise UsageError(f"{option} is {ctx_len}, but {name} has only {positions} positions; use {option} <= {positions}")


def module_input(args: tuple, kwargs: dict):
    """A module's first input, positional or keyword, from a forward hook's (args, kwargs): what a
    transcoder reads (the "HOOKPOINT:input" site)."""
    return args[0] if args else next(iter(kwargs.values()), None)


def output_hidden(output) -> Tensor:
    """The (B, T, d) activations in a hooked module's output: the tensor, or a tuple's first element."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: Tensor):
    """The module's `output` with its activations replaced by `hidden` (what a forward hook returns to splice)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Site(NamedTuple):
    """Where activations are read: a module's output, or (`reads_input`) its first input."""

    module: nn.Module
    reads_input: bool = False


def get_site(model: nn.Module, site: str) -> Site:
    """The `Site` named `site` (a hookpoint, or HOOKPOINT:input); a clear error when the module does not exist."""
    if site.endswith(INPUT_SITE_SUFFIX):
        return Site(get_module(model, site[: -len(INPUT_SITE_SUFFIX)]), True)
    return Site(get_module(model, site))


def get_module(model: nn.Module, hookpoint: str) -> nn.Module:
    """The submodule named `hookpoint`; a clear error listing the real names when it does not exist."""
    modules = dict(model.named_modules())
    if not hookpoint or hookpoint not in modules:
        what = "the hookpoint is empty" if not hookpoint else f"hookpoint '{hookpoint}' is not a module of {type(model).__name__}"
        raise UsageError(f"{what}; modules are: {module_name_summary([name for name in modules if name])}")
    return modules[hookpoint]


def module_name_summary(names: list[str]) -> str:
    """Module names with each stack of numbered layers shown once, as its pattern and range, followed
    by the first layer's children: 'transformer.wte, transformer.h.{0..11} (each with
    transformer.h.0.ln_1, transformer.h.0.attn, ...), lm_head' instead of hundreds of names."""
    shown: dict[str, str] = {}  # the entry of each name or layer stack, in model order
    for name in names:
        stack = _layer_stack_of(name)
        if stack is None:
            shown[name] = name
        else:
            shown.setdefault(stack + ".#", "")  # filled in below, once its layer numbers are known
    for stack, numbers in _layer_stacks(names).items():
        first = f"{stack}.{min(numbers)}"
        children = [name for name in names if name.startswith(first + ".") and name.count(".") == first.count(".") + 1]
        shown[stack + ".#"] = f"{stack}.{{{min(numbers)}..{max(numbers)}}}" + (f" (each with {', '.join(children)})" if children else "")
    return ", ".join(shown.values())


def _layer_stack_of(name: str) -> str | None:
    """The stack a module name is in ('model.layers' for 'model.layers.3.mlp'); None outside numbered layers."""
    parts = name.split(".")
    numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return None if numbered is None else ".".join(parts[:numbered])


def _layer_stacks(names: list[str]) -> dict[str, list[int]]:
    """{stack: its layer numbers} of the numbered layer stacks among module `names`, in model order."""
    stacks: dict[str, list[int]] = {}
    for name in names:
        stack = _layer_stack_of(name)
        if stack is not None:
            stacks.setdefault(stack, []).append(int(name[len(stack) + 1 :].split(".")[0]))
    return stacks


class _StopForward(Exception):
    """Raised by the capture hooks once every hooked module has run: the rest of the LM is not needed."""


@torch.no_grad()
def capture_many(model: nn.Module, modules: list[nn.Module | Site], input_ids: Tensor) -> list[Tensor]:
    """Outputs of several submodules of `model` for `input_ids` (B, T), each (B, T, d), in one forward
    that stops as soon as the last of them has run; for a `Site` that reads its module's input, the
    module's first input (positional or keyword argument) instead.

    Every entry point reads activations through here, so here a hookpoint is refused (one line naming it)
    when it does not run, when its output is not (B, T, d) (or a tuple led by one), or when its
    activations are not finite (a float16 model that overflows)."""
    sites = [module if isinstance(module, Site) else Site(module) for module in modules]
    modules = [site.module for site in sites]
    captured: dict[int, Any] = {}

    def make_hook(position: int, reads_input: bool):
        def hook(_module, args, kwargs, output):
            captured[position] = module_input(args, kwargs) if reads_input else output
            if len(captured) == len(sites):
                raise _StopForward

        return hook

    handles = [site.module.register_forward_hook(make_hook(position, site.reads_input), with_kwargs=True)
               for position, site in enumerate(sites)]
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [f"'{_module_name(model, modules[position])}'" for position in range(len(modules)) if position not in captured]
    if missing:
        names = f"hookpoint{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        raise UsageError(f"{names} did not run in the forward pass of {type(model).__name__} (a container such as a "
                         f"list of layers is never called itself){_residual_hint(model)}")
    outputs = [_hooked_activations(model, modules[position], captured[position], input_ids) for position in range(len(modules))]
    _check_finite(model, modules, outputs)
    return outputs


def hookpoint_widths(model: nn.Module, hookpoints: list[str]) -> dict[str, int]:
    """{hookpoint: d} of the LM's hookpoints, from one forward of a (2, 2) probe: two windows, so that an
    output that does not follow the batch (position embeddings, rotary tables) is refused here, up front."""
    probe = torch.zeros(2, 2, dtype=torch.long, device=next(model.parameters()).device)
    outputs = capture_many(model, [get_site(model, hookpoint) for hookpoint in hookpoints], probe)
    return {hookpoint: output.shape[-1] for hookpoint, output in zip(hookpoints, outputs)}


def _hooked_activations(model: nn.Module, module: nn.Module, output: Any, input_ids: Tensor) -> Tensor:
    """The (B, T, d) activations in a hooked module's `output` (the tensor, or a tuple's first element)
    for `input_ids` (B, T); a UsageError naming the hookpoint when the output is anything else."""
    activations = output[0] if isinstance(output, tuple) and output else output
    if (isinstance(activations, Tensor) and activations.is_floating_point() and activations.ndim == 3
            and activations.shape[:2] == input_ids.shape):
        return activations
    batch, tokens = input_ids.shape
    raise UsageError(f"hookpoint '{_module_name(model, module)}' outputs {_describe_output(output)}, not a float tensor (or "
                     f"a tuple whose first element is one) of shape (batch, tokens, d) = ({batch}, {tokens}, d) for "
                     f"input ids of shape ({batch}, {tokens}){_residual_hint(model)}")


def _describe_output(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a {str(output.dtype).removeprefix('torch.')} tensor of shape {tuple(output.shape)}"
    if isinstance(output, tuple):
        return f"a tuple whose first element is {_describe_output(output[0])}" if output else "an empty tuple"
    return f"a {type(output).__name__}"


def _check_finite(model: nn.Module, modules: list[nn.Module], outputs: list[Tensor]) -> None:
    """A UsageError naming the first hookpoint whose activations hold inf or nan. One reduction per output
    and one device sync in all; the counts of the message are computed only on failure."""
    finite = torch.stack([torch.isfinite(output).all() for output in outputs])
    if bool(finite.all()):
        return
    position = int((~finite).nonzero()[0])
    activations = outputs[position]
    inf, nan = int(torch.isinf(activations).sum()), int(torch.isnan(activations).sum())
    finite_values = activations[torch.isfinite(activations)]
    largest = f"{finite_values.abs().max().item():.3g}" if finite_values.numel() else "none"
    cause = ("the model in float16 overflows; use --model_dtype bfloat16 or float32" if activations.dtype == torch.float16
             else f"the model's own forward produces them in {str(activations.dtype).removeprefix('torch.')} (check its weights)")
    raise UsageError(f"activations at {_module_name(model, modules[position])} are not finite ({inf:,} inf / {nan:,} nan "
                     f"of {activations.numel():,} values; max |finite x| {largest}): {cause}")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The name `module` has in `model` (for messages: the hookpoint the user gave)."""
    return next((name for name, candidate in model.named_modules() if candidate is module), type(module).__name__)


def _residual_hint(model: nn.Module) -> str:
    """'; the residual stream is the output of a block of model.layers.{0..3}' for the LM's longest layer stack."""
    stacks = _layer_stacks([name for name, _ in model.named_modules() if name])
    if not stacks:
        return ""
    stack, numbers = max(stacks.items(), key=lambda item: len(set(item[1])))
    return f"; the residual stream is the output of a block of {stack}.{{{min(numbers)}..{max(numbers)}}}"


def capture_activations(model: nn.Module, module: nn.Module, input_ids: Tensor) -> Tensor:
    """Output of `module` (a submodule of `model`) for `input_ids` (B, T): (B, T, d)."""
    return capture_many(model, [module], input_ids)[0]


class WindowRows(NamedTuple):
    """The rows of consecutive windows, first positions dropped, in window order: what a source hands out."""

    activations: list[Tensor]
    """Per hookpoint, (n_windows * (ctx_len - 1), d) float32."""
    token_ids: Tensor
    """(n_windows * (ctx_len - 1),) int64: the token at each row (-1 where a source has no text)."""


class LMWindowSource:
    """Activations of consecutive token windows, computed by the LM: the source of a streamed run.

    `next_activations(n)` reads the next n windows, runs the LM on them in batches of
    `lm_batch_windows`, drops each window's first position and returns their `WindowRows`.
    """

    def __init__(self, model: nn.Module, hookpoints: list[str], windows: TokenWindows, lm_batch_windows: int = 64):
        self.model = model
        self.hookpoints = list(hookpoints)
        self.modules = [get_site(model, hookpoint) for hookpoint in self.hookpoints]
        self.windows = windows
        self.lm_batch_windows = lm_batch_windows
        self.ctx_len = windows.ctx_len
        self.device = next(model.parameters()).device

    def next_activations(self, n_windows: int) -> WindowRows:
        input_ids = torch.stack([next(self.windows) for _ in range(n_windows)]).to(self.device)
        per_batch = [
            capture_many(self.model, self.modules, input_ids[i : i + self.lm_batch_windows])
            for i in range(0, len(input_ids), self.lm_batch_windows)
        ]
        activations = [torch.cat([outputs[h][:, 1:] for outputs in per_batch]).flatten(0, 1).float()
                       for h in range(len(self.modules))]
        return WindowRows(activations, input_ids[:, 1:].flatten())

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def text_read(self) -> dict[str, Any]:
        """The end of the text read so far (TokenWindows.read_position), for cfg.json's `text_read`."""
        return self.windows.read_position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


class ActivationStream:
    """Endless iterator of shuffled activation batches with exact resume.

    Yields, per step, a dict {hookpoint: (batch_size, d) float32}: the same tokens (rows) for every
    hookpoint, so several SAEs trained from one stream see the same batches. `source` hands out the
    activations of consecutive windows: an LMWindowSource (streaming) or sae.cache.CachedWindows.
    The rows of `excluded_token_ids`, and with `outlier_norm_ratio` > 0 those of outlier norm, are
    dropped from each block before it is shuffled (sae/hygiene.py), so a block yields a varying number
    of batches, the same each time its windows are read again.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        shuffle_buffer_tokens: int,
        seed: int = 0,
        rank: int = 0,
        excluded_token_ids: Sequence[int] = (),
        outlier_norm_ratio: float = 0.0,
    ):
        tokens_per_window = source.ctx_len - 1  # the first position of each window is dropped
        self.windows_per_block = -(-max(shuffle_buffer_tokens, batch_size) // tokens_per_window)
        self.batches_per_block = self.windows_per_block * tokens_per_window // batch_size
        self.source = source
        self.hookpoints = list(source.hookpoints)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.excluded_token_ids = list(excluded_token_ids)
        self.outlier_norm_ratio = outlier_norm_ratio
        self.block_index = -1  # the block being handed out; -1 before the first
        self.batches_done = 0  # batches of the current block handed out
        self.batches_in_block = 0  # batches the current block yields (batches_per_block, less the rows dropped)
        self._block: list[Tensor] | None = None
        self._source_state_at_block_start: dict[str, Any] | None = None

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> dict[str, Tensor]:
        empty_blocks = 0
        while self._block is None or self.batches_done == self.batches_in_block:
            self._fill_block(self.block_index + 1)
            empty_blocks += self.batches_in_block == 0
            if empty_blocks == MAX_EMPTY_BLOCKS:
                raise UsageError(f"{MAX_EMPTY_BLOCKS} shuffle blocks in a row held fewer than a batch of rows that token "
                                 "hygiene keeps (special tokens, outlier norms): the text is almost all special tokens, "
                                 "or data.outlier_norm_ratio is too low")
        start = self.batches_done * self.batch_size
        self.batches_done += 1
        return {hookpoint: block[start : start + self.batch_size] for hookpoint, block in zip(self.hookpoints, self._block)}

    def _fill_block(self, block_index: int) -> None:
        """Take the next windows_per_block windows' activations and shuffle them (one permutation for all hookpoints)."""
        self._source_state_at_block_start = self.source.state_dict()
        activations, token_ids = self.source.next_activations(self.windows_per_block)
        keep = norm_keep_mask(activations, token_keep_mask(token_ids, self.excluded_token_ids), self.outlier_norm_ratio)
        kept = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # None: every row (the order of old runs)
        n_rows = len(activations[0]) if kept is None else len(kept)
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, block_index)) & (2**63 - 1))
        self.batches_in_block = min(n_rows // self.batch_size, self.batches_per_block)
        order = torch.randperm(n_rows, generator=generator)[: self.batches_in_block * self.batch_size]
        if kept is not None:
            order = kept[order.to(kept.device)]
        self._block = [rows[order.to(rows.device)] for rows in activations]
        self.block_index = block_index
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the source's position at the start of the current block, and progress in it."""
        return {
            "block_index": self.block_index,
            "batches_done": self.batches_done,
            "windows": self._source_state_at_block_start if self._block is not None else self.source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["windows"])
        self._block = None
        self.block_index = -1
        self.batches_done = 0
        if state["block_index"] >= 0:
            self._fill_block(state["block_index"])  # the same windows, the same permutation
            self.batches_done = state["batches_done"]


MAX_EMPTY_BLOCKS = 100
"""Shuffle blocks in a row with no batch of kept rows before the stream gives up (a text of almost only
special tokens would otherwise read forever)."""


class PlaceholderWindowSource:
    """Window source of the ranks of a latent-shard group other than its first.

    All ranks of a group train on the first rank's batches (`ShardLayout.broadcast_rows`), so the
    others need batches of the right shape only: zeros, with no LM forward and no data read. Its
    stream state is empty; on resume the first rank's state alone restores the group's data.
    """

    def __init__(self, hookpoints: list[str], ctx_len: int, d_in_of: dict[str, int], device: torch.device | str):
        self.hookpoints = list(hookpoints)
        self.ctx_len = ctx_len
        self.d_in_of = d_in_of
        self.device = device

    def next_activations(self, n_windows: int) -> WindowRows:
        rows = n_windows * (self.ctx_len - 1)
        return WindowRows([torch.zeros(rows, self.d_in_of[hookpoint], device=self.device) for hookpoint in self.hookpoints],
                          torch.full((rows,), -1, dtype=torch.long, device=self.device))

    def state_dict(self) -> dict:
        return {}

    def text_read(self) -> None:
        """Nothing: the group's first rank reads the text."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

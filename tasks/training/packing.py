"""Packed trials: N models of one shape trained side by side as one, in one engine call.

Pure PyTorch (no Prefect), so it is tested on its own on a GPU machine. After HFTA (MLSys'21)
and torch.func's model-ensembling tutorial:

- the members' parameters and buffers are stacked (`torch.func.stack_module_state`); one
  forward of `functional_call` under `vmap(randomness="different")` runs every layer once for
  all members (a conv becomes one grouped conv), with each member's own Dropout draws and its
  own BatchNorm running statistics (stacked buffers, non-persistent ones included);
- the summed per-member losses are differentiated once: member i's gradient is the gradient of
  its own loss, nothing else depends on its parameters;
- the optimizer step is ours: Adam, AdamW and SGD (momentum 0.9) on the stacked tensors with a
  learning rate and a weight decay per member (tensors of shape [N], broadcast), following
  torch.optim's update rules term by term;
- each member reads its own data order (its seed's `shuffle`), gathered with `index_select` from
  the data resident on the device;
- a member is frozen by a mask (its parameters, optimizer state, buffers and step count keep
  their values): a diverged member, or one whose checkpoint is ahead of the others;
- on CUDA the whole step (forward, backward, optimizer step, the on-device loss and accuracy
  sums) is captured once as a CUDA graph and replayed; the batch indices, the rates and the mask
  are static device tensors written before each replay. The warm-up and the capture run with
  every member masked, so they change nothing; a capture that raises falls back to eager.

Randomness (Dropout) is reseeded at the start of every epoch from the pack's members and the
epoch, so a pack resumed from its checkpoints draws what the uninterrupted pack drew: no RNG
state needs to be stored. The draws depend on the pack's composition (member i's mask is row i
of one [N, ...] draw), so a packed member with Dropout does not equal the same trial trained
alone; without randomness in the forward it does, within float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tasks.training.determinism import RNG_LOCK, device_generator, shuffle

log = logging.getLogger(__name__)

# Divergence is checked every this many steps (and at every epoch's end): often enough to stop a
# NaN run within a second, rarely enough that the GPU is not synchronised on every step.
DIVERGENCE_CHECK_STEPS = 20
# A loss above this is divergence even while it is finite: a 10-class classifier starts near
# ln(10) = 2.3, and a too-large step sends it to 1e4..1e29 (measured: Adam at lr 1 and 10, SGD at
# 10) where it stays at chance accuracy; NaN and infinity are caught by the same comparison.
DIVERGENCE_LOSS = 100 * math.log(10)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# torch.optim's defaults, which the trials' optimizers use (tasks/train.py make_optimizer).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01, "sgd": 0.0}
OPTIMIZERS = tuple(DEFAULT_WEIGHT_DECAY)

# Masked steps run before a capture, so cuDNN/cuBLAS pick and allocate their kernels outside it.
GRAPH_WARMUP_STEPS = 3

Engine = Literal["eager", "graph", "packed", "packed+graph"]

class RateSchedule(Protocol):
    """A trial's learning rate per global step (tasks/training/schedules)."""

    varies: bool

    def rate(self, step: int) -> float: ...


class Unpackable(Exception):
    """The members cannot train as one pack (the reason is the message): they train one by one."""


def divergence_message(loss: float, epoch: int, learning_rate: float, step: int | None = None) -> str:
    where = f"mean loss {loss:.4g} at epoch {epoch}, step {step}" if step is not None else \
        f"mean training loss {loss:.4g} at epoch {epoch}"
    return (f"{where} (learning rate {learning_rate:g}) is past {DIVERGENCE_LOSS:.0f} or not finite; "
            "the trial was stopped")


def steps_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)


def engine_name(packed: bool, graph: bool) -> Engine:
    if packed:
        return "packed+graph" if graph else "packed"
    return "graph" if graph else "eager"


# --- the engine -------------------------------------------------------------------------------------

@dataclass
class MemberResult:
    """What one member of a pack produced; `state_dict` is None for a diverged member."""

    history: list[dict]
    state_dict: dict[str, torch.Tensor] | None = None
    error: str | None = None
    resumed_from: int | None = None
    train_seconds: float = 0.0
    samples_per_second: float = 0.0


@dataclass
class MemberStart:
    """Where a member starts: epoch 1 with its seeded weights, or after a checkpoint."""

    epoch: int = 0  # the last completed epoch
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


class PackedTrainer:
    """N members (models of one shape, one trial spec each) trained as one.

    `models`: each member's network, built and seeded as its trial alone builds it (the same
    initial weights), already on `device`. The specs share one `pack_key` (the planner's
    business); the engine reads their learning_rate, seed and training group. `schedules`: each
    member's rate per step (None: its learning rate throughout). `graphs`: capture the step as a
    CUDA graph (CUDA only, fp32 or bf16).
    Raises Unpackable when vmap cannot run the model (a custom autograd Function without a
    vmap rule, `.item()` in forward, ...): the probe step, run with every member masked, says so.
    """

    def __init__(self, models: Sequence[nn.Module], specs: Sequence, train_x: torch.Tensor,
                 train_y: torch.Tensor, schedules: Sequence[RateSchedule] | None = None, graphs: bool = False,
                 say: Callable[[str], None] = log.info):
        first = specs[0].training
        if first.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {first.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if first.precision == "fp16":
            raise Unpackable("fp16 trains with a gradient scaler, which the packed engine does not carry")
        if train_x is None:
            raise Unpackable("the data is read by a DataLoader (not resident on the device)")
        self.specs, self.say = list(specs), say
        self.size = len(specs)
        self.device = train_y.device
        self.train_x, self.train_y = train_x, train_y
        self.batch_size, self.epochs = first.batch_size, first.epochs
        self.optimizer, self.precision = first.optimizer, first.precision
        self.base = models[0]
        self._names_of_state(models[0])
        params, buffers = stack_module_state(list(models))
        if len({params[name].dtype for name in self.param_names}) > 1:
            raise Unpackable("its parameters have several dtypes")
        n, device = self.size, self.device
        # Every member's parameters as one row of one [N, P] tensor, the parameters views of it:
        # the optimizer step is then one set of elementwise kernels for the whole pack, not one
        # per parameter tensor (those were most of a packed CUDA-graph step of the small CNN).
        self.shapes = {name: params[name].shape[1:] for name in self.param_names}
        self.flat = torch.cat([params[name].detach().reshape(n, -1) for name in self.param_names], dim=1)
        self.flat.requires_grad_()
        self.buffers = {name: buffers[name] for name in self.buffer_names}
        # Rates, decays and step counts in float64: torch.optim computes its scalars (lr / bias
        # correction, ...) in Python floats and rounds them once, as these are rounded below.
        self.rate = torch.tensor([s.learning_rate for s in specs], dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor(
            [DEFAULT_WEIGHT_DECAY[self.optimizer] if s.training.weight_decay is None else s.training.weight_decay
             for s in specs],
            dtype=torch.float64, device=device)
        self.active = torch.zeros(n, dtype=torch.bool, device=device)
        self.steps = torch.zeros(n, dtype=torch.float64, device=device)  # optimizer steps taken, per member
        moments = ("exp_avg", "exp_avg_sq") if self.optimizer != "sgd" else ("momentum_buffer",)
        self.moments = {moment: torch.zeros_like(self.flat, requires_grad=False) for moment in moments}
        self.loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.correct = torch.zeros(n, dtype=torch.int64, device=device)
        self.steps_per_epoch = steps_per_epoch(len(train_y), self.batch_size)
        self.schedules = list(schedules) if schedules is not None else [None] * n
        self._forward = vmap(self._member_loss, randomness="different")
        self._probe()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self._batch_index: torch.Tensor | None = None
        if graphs:
            self._capture()

    @property
    def engine(self) -> Engine:
        return engine_name(self.size > 1, self.graph is not None)

    # --- state in and out, in an unpacked model's names ---------------------------------------------

    def _names_of_state(self, model: nn.Module) -> None:
        """The parameter and buffer names vmap works on, and which state_dict key is which: a
        state dict lists persistent buffers only, and a tied tensor under each of its names."""
        self.param_names = [name for name, _ in model.named_parameters()]
        self.buffer_names = [name for name, _ in model.named_buffers()]
        owner = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.state_keys = {key: owner[id(t)] for key, t in model.state_dict(keep_vars=True).items()}
        self.layouts = {name: t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4
                        for name, t in [*model.named_parameters(), *model.named_buffers()]}

    def _parameters(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter's [N, ...] view of a flat [N, P] tensor (the weights, a moment, a gradient)."""
        views, start = {}, 0
        for name in self.param_names:
            count = math.prod(self.shapes[name])
            views[name] = flat[:, start:start + count].view(self.size, *self.shapes[name])
            start += count
        return views

    def _stacked(self, name: str) -> torch.Tensor:
        return self._parameters(self.flat)[name] if name in self.shapes else self.buffers[name]

    def member_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s weights with the keys (and layouts) its model alone has."""
        state = {}
        for key, name in self.state_keys.items():
            value = self._stacked(name)[index].detach().clone()
            if self.layouts[name]:
                value = value.contiguous(memory_format=torch.channels_last)
            state[key] = value
        return state

    def optimizer_state(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        """Member `index`'s optimizer state per parameter name, as torch.optim names it."""
        state = {}
        moments = {moment: self._parameters(flat) for moment, flat in self.moments.items()}
        for name in self.param_names:
            entry = {moment: views[name][index].detach().clone() for moment, views in moments.items()}
            if self.optimizer != "sgd":
                entry["step"] = self.steps[index].detach().float().clone()
            state[name] = entry
        return state

    @torch.no_grad()
    def load_member(self, index: int, state_dict: dict[str, torch.Tensor],
                    optimizer_state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Member `index` continues from a checkpoint: weights, buffers and optimizer state."""
        for key, name in self.state_keys.items():
            self._stacked(name)[index].copy_(state_dict[key])
        moments = {moment: self._parameters(flat) for moment, flat in self.moments.items()}
        for name in self.param_names:
            entry = optimizer_state.get(name, {})
            for moment, views in moments.items():
                if moment in entry:
                    views[name][index].copy_(entry[moment])
                else:  # SGD's momentum before its first step: nothing yet, as torch.optim has it
                    views[name][index].zero_()
            if self.optimizer != "sgd":
                self.steps[index] = float(entry.get("step", 0.0))

    # --- one step ------------------------------------------------------------------------------------

    def _member_loss(self, params, buffers, images, labels):
        logits = functional_call(self.base, (params, buffers), (images,))
        return nn.functional.cross_entropy(logits, labels), logits

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # No cast cache: inside a CUDA graph a cached cast would be a stale copy of the weights.
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision], cache_enabled=False)

    def _step(self, index: torch.Tensor) -> None:
        """One step of every active member on the batch `index` [N, B] (rows: members' images)."""
        flat = index.reshape(-1)
        images = self.train_x.index_select(0, flat).unflatten(0, index.shape)
        labels = self.train_y.index_select(0, flat).view(index.shape)
        before = {name: b.clone() for name, b in self.buffers.items()}  # BatchNorm updates them in place
        with self._autocast():
            losses, logits = self._forward(self._parameters(self.flat), self.buffers, images, labels)
        (grad,) = torch.autograd.grad(losses.sum(), [self.flat])
        with torch.no_grad():
            self._update(grad)
            for name, buffer in self.buffers.items():
                buffer.copy_(torch.where(self._member_view(buffer), buffer, before[name]))
            count = index.shape[1]
            self.loss_sum.add_(torch.where(self.active, (losses.detach() * count).double(), 0.0))
            hits = (logits.detach().argmax(dim=-1) == labels).sum(dim=-1)
            self.correct.add_(torch.where(self.active, hits, 0))

    def _member_view(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.active.view((-1,) + (1,) * (tensor.dim() - 1))

    def _update(self, grad: torch.Tensor) -> None:
        """torch.optim's rules (the fused kernels' order of operations: Adam's step is
        `param - step_size * exp_avg / denom`) on every member's flat parameters at once, with a
        rate and a weight decay per member; a masked member keeps every value it had."""
        self.steps.add_(self.active.double())
        param = self.flat

        def per_member(values: torch.Tensor) -> torch.Tensor:
            return values.to(param.dtype).view(-1, 1)

        keep = self.active.view(-1, 1)
        if self.optimizer == "sgd":
            grad = grad + per_member(self.weight_decay) * param
            momentum = self.moments["momentum_buffer"] * SGD_MOMENTUM + grad
            new = param - per_member(self.rate) * momentum
            self.moments["momentum_buffer"].copy_(torch.where(keep, momentum, self.moments["momentum_buffer"]))
        else:
            beta1, beta2 = ADAM_BETAS
            step_size = self.rate / (1 - torch.pow(beta1, self.steps))
            bias_correction2_sqrt = (1 - torch.pow(beta2, self.steps)).sqrt()
            start = param
            if self.optimizer == "adamw":  # decoupled: the weights shrink before the step
                start = param * per_member(1 - self.rate * self.weight_decay)
            else:
                grad = grad + per_member(self.weight_decay) * param
            exp_avg = self.moments["exp_avg"].lerp(grad, 1 - beta1)
            exp_avg_sq = self.moments["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
            denom = exp_avg_sq.sqrt() / per_member(bias_correction2_sqrt) + ADAM_EPS
            new = start - per_member(step_size) * exp_avg / denom
            self.moments["exp_avg"].copy_(torch.where(keep, exp_avg, self.moments["exp_avg"]))
            self.moments["exp_avg_sq"].copy_(torch.where(keep, exp_avg_sq, self.moments["exp_avg_sq"]))
        param.copy_(torch.where(keep, new, param))

    def _masked(self, index: torch.Tensor, repeats: int) -> None:
        """Steps that change nothing (every member masked): a probe, a graph's warm-up."""
        active = self.active.clone()
        self.active.fill_(False)
        try:
            for _ in range(repeats):
                self._step(index)
        finally:
            self.active.copy_(active)
            self.loss_sum.zero_()
            self.correct.zero_()

    def _probe(self) -> None:
        index = torch.zeros(self.size, min(self.batch_size, len(self.train_y)), dtype=torch.long, device=self.device)
        self.base.train()
        try:
            self._masked(index, 1)
        except Exception as error:  # what vmap or the model raised is the reason, as the user sees it
            raise Unpackable(f"vmap cannot run this model ({type(error).__name__}: {error})") from error

    def _capture(self) -> None:
        """The full-batch step as a CUDA graph; eager (with the reason said once) if it fails."""
        reason = None
        if self.device.type != "cuda":
            reason = "CUDA graphs need a CUDA device"
        elif len(self.train_y) < self.batch_size:
            reason = "no full batch to capture"
        if reason is None:
            index = torch.zeros(self.size, self.batch_size, dtype=torch.long, device=self.device)
            try:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._masked(index, GRAPH_WARMUP_STEPS)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                active = self.active.clone()
                self.active.fill_(False)
                with torch.cuda.graph(graph):
                    self._step(index)
                self.active.copy_(active)
                self.graph, self._batch_index = graph, index
            except Exception as error:
                reason = f"capture failed ({type(error).__name__}: {error})"
        if reason is not None:
            self.graph_error = reason
            self.say(f"CUDA graph not used, the step runs eager: {reason}")

    # --- epochs --------------------------------------------------------------------------------------

    def _rates(self, epoch: int) -> torch.Tensor:
        """Every step's rate of every member in `epoch` [steps, N]: a function of the step alone."""
        first = (epoch - 1) * self.steps_per_epoch
        rows = [[s.rate(first + step) if s is not None and s.varies else spec.learning_rate
                 for s, spec in zip(self.schedules, self.specs)] for step in range(self.steps_per_epoch)]
        return torch.tensor(rows, dtype=torch.float64).to(self.device)

    def _reseed(self, epoch: int) -> None:
        """The randomness of an epoch (Dropout) from the pack's members and the epoch alone."""
        members = [[s.learning_rate, s.seed] for s in self.specs]
        digest = hashlib.sha256(json.dumps([members, epoch]).encode()).digest()
        seed = int.from_bytes(digest[:8], "little") >> 1
        with RNG_LOCK:
            device_generator(self.device).manual_seed(seed)

    def train(self, starts: Sequence[MemberStart] | None = None, stop_at: int | None = None,
              on_epoch: Callable[[int, dict], None] | None = None,
              evaluate: Callable[[Callable[[torch.Tensor], torch.Tensor]], list[tuple[float, float]]] | None = None,
              ) -> list[MemberResult]:
        """Train every member to its last epoch (or `stop_at`): members start after their
        checkpoint's epoch (`starts`, loaded with `load_member`); a member ahead of the others is
        masked until the pack reaches it. `on_epoch(i, record)` after each epoch of member i
        (checkpoint it there); `evaluate(forward)` gives each member's (val loss, val accuracy)."""
        starts = list(starts) if starts is not None else [MemberStart() for _ in self.specs]
        last = self.epochs if stop_at is None else min(stop_at, self.epochs)
        results = [MemberResult(history=list(s.history), resumed_from=s.epoch or None, train_seconds=s.train_seconds)
                   for s in starts]
        diverged = [False] * self.size
        size, batch = len(self.train_y), self.batch_size
        full = size // batch
        trained = [0] * self.size
        step_seconds = 0.0
        started = time.perf_counter()
        for epoch in range(min(s.epoch for s in starts) + 1, last + 1):
            wanted = [s.epoch < epoch and not gone for s, gone in zip(starts, diverged)]
            if not any(wanted):
                continue
            self.active.copy_(torch.tensor(wanted, device=self.device))
            self.loss_sum.zero_()
            self.correct.zero_()
            self._reseed(epoch)
            self.base.train()
            orders = torch.stack([shuffle(s.seed, epoch, size, self.device) for s in self.specs])
            rates = self._rates(epoch)
            epoch_started = time.perf_counter()
            seen = 0
            for step in range(self.steps_per_epoch):
                self.rate.copy_(rates[step])
                index = orders[:, step * batch:(step + 1) * batch]
                if self.graph is not None and step < full:
                    self._batch_index.copy_(index)
                    self.graph.replay()
                else:
                    self._step(index)
                seen += index.shape[1]
                if step % DIVERGENCE_CHECK_STEPS == 0:
                    self._check(epoch, step, seen, wanted, diverged, results)
                    if not any(wanted):
                        break
            sums = (self.loss_sum / size).tolist()
            correct = self.correct.tolist()
            step_seconds += time.perf_counter() - epoch_started
            for i, loss in enumerate(sums):
                if wanted[i] and not loss < DIVERGENCE_LOSS:
                    self._diverge(i, divergence_message(loss, epoch, self.specs[i].learning_rate), wanted, diverged, results)
            validation = evaluate(self.forward_eval) if evaluate is not None else [(math.nan, math.nan)] * self.size
            for i in range(self.size):
                if not wanted[i]:
                    continue
                trained[i] += size
                rate = rates[-1, i].item()
                record = {"epoch": epoch, "train_loss": sums[i], "train_accuracy": correct[i] / size,
                          "val_loss": validation[i][0], "val_accuracy": validation[i][1], "lr": rate}
                results[i].history.append(record)
                results[i].train_seconds = starts[i].train_seconds + time.perf_counter() - started
                if on_epoch is not None:
                    on_epoch(i, record)
        for i, result in enumerate(results):
            if not diverged[i]:
                result.state_dict = self.member_state_dict(i)
            result.samples_per_second = trained[i] / step_seconds if step_seconds > 0 else 0.0
        return results

    def _check(self, epoch: int, step: int, seen: int, wanted: list[bool], diverged: list[bool],
               results: list[MemberResult]) -> None:
        """The running mean holds every step's loss, so a spike between checks is not missed."""
        for i, total in enumerate(self.loss_sum.tolist()):
            if wanted[i] and not (running := total / seen) < DIVERGENCE_LOSS:
                self._diverge(i, divergence_message(running, epoch, self.specs[i].learning_rate, step),
                              wanted, diverged, results)

    def _diverge(self, i: int, message: str, wanted: list[bool], diverged: list[bool],
                 results: list[MemberResult]) -> None:
        """Member i stops where it is (masked from now on); the others go on."""
        wanted[i], diverged[i] = False, True
        results[i].error = message
        self.active[i] = False
        self.say(f"[member {i}] {message}")

    # --- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_eval(self, images: torch.Tensor) -> torch.Tensor:
        """Every member's logits [N, B, classes] for one batch of images, in eval mode (fp32)."""
        self.base.eval()
        try:
            return vmap(lambda p, b: functional_call(self.base, (p, b), (images,)), randomness="different")(
                self._parameters(self.flat), self.buffers)
        finally:
            self.base.train()


def measure_pack(forward: Callable[[torch.Tensor], torch.Tensor],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) of every member over a split, as tasks/evaluate.py's
    `measure` computes them for one model."""
    loss_sum = correct = None
    count = 0
    for images, labels in batches:
        logits = forward(images).float()
        losses = torch.stack([nn.functional.cross_entropy(member, labels, reduction="sum") for member in logits])
        hits = (logits.argmax(dim=-1) == labels).sum(dim=-1)
        loss_sum = losses.double() if loss_sum is None else loss_sum + losses.double()
        correct = hits if correct is None else correct + hits
        count += len(labels)
    return [(loss / count, hit / count) for loss, hit in zip(loss_sum.tolist(), correct.tolist())]

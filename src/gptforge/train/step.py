"""The update path: one optimizer step from a global batch, written once for every command.

Micro-steps with gradient accumulation (gradients synchronized on the last one only), clipping, the guard's
verdict on the host (speed.sync_free off) or on the device (masked_step, between read steps with
speed.sync_free), the fp16 gradient scaler, sparsity masks re-applied after the update. `train`, `lr-find`,
`bench` and `doctor` all step through Stepper.
"""

from __future__ import annotations

import math

import torch

from gptforge.config import Config
from gptforge.observe.phases import PhaseTimer
from gptforge.parallel.distribute import grad_sync
from gptforge.parallel.world import World
from gptforge.train.guard import Guard


def sparsity_masks(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) for every trainable linear weight holding zeros; re-applied after each update."""
    masks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            mask = module.weight.detach() != 0
            if not mask.all():
                masks.append((module.weight, mask))
    return masks


class Stepper:
    """One optimizer step: micro-steps with gradient accumulation, clipping, the guard's verdict, the update."""

    def __init__(self, model, raw_model, optimizer, scaler, precision, world: World, cfg: Config, sparsity_masks,
                 guard: Guard | None = None, task=None):
        self.task = task  # train/task.py: the family's loss per micro-step (None: model(x, y))
        self.model, self.optimizer, self.scaler, self.precision, self.world = model, optimizer, scaler, precision, world
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        self.debug = cfg.debug
        self.warmup = cfg.schedule.warmup_steps
        self.sparsity_masks = sparsity_masks
        self.guard = guard
        # speed.sync_free: loss and gradient norm are read back on log, eval and save steps only.
        self.sync_free = cfg.speed.sync_free
        self.read_every = [n for n in (cfg.train.log_every, cfg.eval.every, cfg.train.save_every) if n]
        self.device_skips = 0  # set on read steps: steps skipped on the device since the previous read
        self._counters: torch.Tensor | None = None  # (3,) int32 on the device: skipped, run of skips, any applied
        self.phases: PhaseTimer | None = None  # set by `gptforge bench` to split each step's time
        # Ctrl-C (train/interrupt.py): this process asks in the step's all-reduce; on steps read back,
        # stop_agreed says whether any process asked, so that all stop after the same step.
        self.stop_asked = False
        self.stop_agreed = False
        self._stop_votes: torch.Tensor | None = None

    def _injected(self, step: int, at: int | None) -> bool:
        return at is not None and at <= step < at + self.debug.inject_count

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr_scale: float, step: int) -> tuple[float, float, str | None]:
        """Optimizer step number `step` (from 1), every group at its base_lr x `lr_scale` (the schedule).
        Returns the mean loss over all processes, the gradient norm, and why the update was skipped (None
        when it was applied). With speed.sync_free, between read steps both come back as 0-dim device
        tensors and the skip is decided on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale  # the schedule's multiplier of each group's own peak
        if self.phases:
            self.phases.start()
        loss_sum = self._forward_backward(batches, self._loss_scale(step))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when parameters are sharded
            grad_norm = grad_norm.full_tensor()
        loss = self._mean_loss(loss_sum)
        if self.sync_free and not any(step % n == 0 for n in self.read_every):
            return self._device_update(loss, grad_norm.float())
        if self.sync_free:
            self._read_counters()
        loss, grad_norm = float(loss), float(grad_norm)
        self.stop_agreed = bool(self._stop_votes)  # already on the host's side of the sync just made
        reason = self.guard.check(loss, grad_norm, spikes=step > self.warmup) if self.guard is not None else None
        if self.scaler is not None:
            if reason is None or reason == "nonfinite":  # fp16 overflow is the scaler's to handle
                self.scaler.step(self.optimizer)
                reason = None
            self.scaler.update()
        elif reason is None:
            self.optimizer.step()
        self._after_update()
        return loss, grad_norm, reason

    def _loss_scale(self, step: int) -> float:
        """1, or the debug.inject_* fault this step is to carry (NaN, or a 100x spike)."""
        if self._injected(step, self.debug.inject_nan_at_step):
            return math.nan
        if self._injected(step, self.debug.inject_spike_at_step):
            return 100.0
        return 1.0

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
        """Every micro-step's forward and backward; gradients are synchronized on the last one only. Returns
        this process's summed loss (already divided by the number of micro-steps) on the device."""
        accum, phases = len(batches), self.phases
        loss_sum = torch.zeros((), device=self.params[0].device)
        for i, (x, y) in enumerate(batches):
            with grad_sync(self.model, enabled=i == accum - 1), self.precision.autocast():
                loss = (self.task.loss(self.model, x, y, i) if self.task else self.model(x, y)) * (scale / accum)
                loss_sum += loss.detach()
                if phases:
                    phases.mark("forward")
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                if phases:
                    phases.mark("backward")
        return loss_sum

    def _mean_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """One all-reduce: the mean loss over processes, NaN when any process saw a non-finite one, so that
        every process decides alike, and the processes' stop requests. A 0-dim tensor on the device."""
        loss_sum = loss_sum.float()
        asked = torch.full_like(loss_sum, float(self.stop_asked))
        stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), asked])
        self.world.all_reduce(stats)
        self._stop_votes = stats[2] > 0
        return torch.where(stats[1] > 0, torch.full_like(stats[0], math.nan), stats[0] / self.world.world_size)

    def _device_update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """speed.sync_free between read steps: the same update, every decision taken on the device, nothing
        read back. Non-finite steps are skipped by masked_step (the spike rule waits for a read step)."""
        self.device_skips = 0
        if self.scaler is not None:  # fp16: non-finite steps are the scaler's to skip, as in step()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.guard is not None and self.guard.cfg.enabled:
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            masked_step(self.optimizer, finite)
            self._count(finite)
        else:
            self.optimizer.step()
        self._after_update()
        return loss, grad_norm, None

    def _after_update(self) -> None:
        """Sparsity masks back on, gradients dropped; the step's optimizer phase ends here (clipping and the
        guard's decision included)."""
        with torch.no_grad():
            for weight, mask in self.sparsity_masks:
                weight.mul_(mask)
        self.optimizer.zero_grad(set_to_none=True)
        if self.phases:
            self.phases.mark("optimizer")

    def _count(self, finite: torch.Tensor) -> None:
        """Device-side skip counters: total skipped, the current run of skips, whether any step was applied."""
        if self._counters is None:
            self._counters = torch.zeros(3, dtype=torch.int32, device=finite.device)
        bad = (~finite).int()
        skipped, run, applied = self._counters.unbind()
        self._counters = torch.stack([skipped + bad, (run + 1) * bad, torch.maximum(applied, 1 - bad)])

    def _read_counters(self) -> None:
        """On a read step: the device's skip counters into device_skips and the guard's consecutive count."""
        self.device_skips = 0
        if self._counters is None:
            return
        skipped, run, applied = self._counters.tolist()
        self._counters = None
        self.device_skips = skipped
        if self.guard is not None:
            self.guard.consecutive = run if applied else self.guard.consecutive + run


def masked_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() where the 0-dim bool tensor `ok` is True; where it is False, parameters and optimizer
    state stay exactly as they were. Decided on the device: no host sync.

    torch's fused Adam / AdamW take the flag themselves (`found_inf`, as GradScaler passes it): the kernel
    leaves parameters and moments alone and the step counter is put back, at no extra memory. Every other
    optimizer (Muon, foreach AdamW, sharded parameters) steps, then torch.where puts back copies taken
    before the step: a copy of parameters and state per step. State created by a skipped first step is set
    to zeros, as optimizers initialize it. State held on another device than `ok` (Muon's CPU step counters)
    needs `ok` copied there, a small device-to-host read.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    if fused and not any(hasattr(p, "to_local") for p in params):
        optimizer.found_inf, optimizer.grad_scale = (~ok).float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        return
    saved_params = [_local(p).detach().clone() for p in params]
    saved_state = [{k: _local(v).clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                   if p in optimizer.state else {} for p in params]
    optimizer.step()
    flags = {ok.device: ok}  # the flag on each device that holds state, copied there once
    with torch.no_grad():
        for p, before in zip(params, saved_params):
            _keep_where(flags, _local(p), before)
        for p, before in zip(params, saved_state):
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value):
                    _keep_where(flags, _local(value), before.get(key))
                elif key in before and value != before[key] and not bool(ok):  # a Python number: a host read
                    state[key] = before[key]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view, written through), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _keep_where(flags: dict[torch.device, torch.Tensor], now: torch.Tensor, before: torch.Tensor | None) -> None:
    """now = ok ? now : before (zeros when there was nothing before), in place; flags: ok by device."""
    if now.device not in flags:
        flags[now.device] = next(iter(flags.values())).to(now.device)
    now.copy_(torch.where(flags[now.device], now, before if before is not None else torch.zeros_like(now)))

"""The `rl` stage: rollouts from the engine, verifiable rewards, the K1.5 objective, MuonClip.

One iteration (= one policy version):
1. rollout: top up the groups in flight to `prompts_per_iter`, extend every unfinished response
   by a segment at this iteration's temperature (partial rollout), collect finished groups;
2. reward: score each group's K responses with its task's reward; over-budget responses get the
   penalty; excluded ones (sandbox errors) leave the advantage;
3. train: the K1.5 loss on the response tokens against the log-probabilities recorded at
   sampling time (+ PTX loss on SFT batches), one MuonClip step;
4. sync: the new weights go to the engine as the next policy version (engine=openai: written
   under weights_dir, loaded by the server between drained requests, then checked).
The orchestrator's pieces are reused: build_run (model, optimizer, schedule, PTX loader from the
`data` section, tracker hooks, resume), the backend's gradient reduction and checkpoints, the
one update sequence (`apply_update`) and the lifecycle hooks. Under a distributed backend
(`parallel.backend=h800`: DP, EP, DP x EP) rollouts, rewards and training are spread over the
data ranks and the engines are fed by the sharded weight push (`k2_rl.data_ranks`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from k2_core.config import RunConfig
from k2_core.errors import ConfigError

from .options import RlOptions
from .rewards.isolation import log_protections, sandbox_protections


def _check_distributed(cfg: RunConfig, opts: RlOptions) -> None:
    """Refuse, in one line each, what `k2 rl` does not run under a distributed backend."""
    if cfg.parallel.backend == "single":
        return
    where = f"under parallel.backend={cfg.parallel.backend}"
    if int(cfg.parallel.options.get("pp", 1)) > 1:
        # the K1.5 loss needs each response's whole log-probability on one rank, and the
        # engines the whole model: a pipeline stage has neither
        raise ConfigError(
            f"parallel.options.pp: k2 rl does not run with pipeline stages "
            f"(pp={cfg.parallel.options['pp']}); use dp/ep (k2 sft runs under pp)"
        )
    if opts.engine != "colocated":
        raise ConfigError(
            f"plugins.rl.engine: {opts.engine!r} is not supported {where}; use "
            "engine=colocated (engines on the data ranks, fed by the weight push)"
        )
    if opts.critic.enabled:
        raise ConfigError(
            f"plugins.rl.critic.enabled: the closed-loop critic runs in one "
            f"process only, not {where}; set it to false"
        )


def prepare_rl_config(cfg: RunConfig) -> tuple[RunConfig, RlOptions, Any]:
    """(config with the init checkpoint's model, rl options, tokenizer); only the checkpoint's
    configs are read here, no weights."""
    from k2_core.modelio import checkpoint_configs

    from .chat_data import load_tokenizer_of, tokenizer_uri_of
    from .checkpoints import resolve_checkpoint
    from .sft import _beside

    if "rl" not in cfg.plugins:
        raise ConfigError(
            "plugins.rl.init: missing; name the policy checkpoint "
            "(e.g. plugins.rl.init=runs/sft-math)"
        )
    opts = RlOptions.model_validate(cfg.plugins["rl"])
    _check_distributed(cfg, opts)
    init = resolve_checkpoint(opts.init)
    model_cfg, moe_cfg, init_cfg = checkpoint_configs(init)
    tok_uri = opts.tokenizer or _beside(init) or tokenizer_uri_of(init_cfg)
    tokenizer = load_tokenizer_of(init_cfg, tok_uri)
    data_opts = dict(cfg.data.options)
    if cfg.data.dataset == "chat":
        data_opts["tokenizer"] = tok_uri
    opts = opts.model_copy(update={"init": init, "tokenizer": tok_uri})
    cfg = cfg.model_copy(
        update={
            "model": model_cfg,
            "moe": moe_cfg,
            "plugins": {**cfg.plugins, "rl": opts.model_dump(mode="json")},
            "data": cfg.data.model_copy(update={"options": data_opts}),
        }
    )
    return cfg, opts, tokenizer


class RLTrainer:
    """Holds the run, the engine, the rollout manager and the rewards of one `k2 rl` run."""

    def __init__(
        self, cfg: RunConfig, progress: Callable[[int, dict[str, float]], None] | None = None
    ):
        from k2_core.model import K2ForCausalLM
        from k2_core.orchestrator import build_run
        from k2_core.plugins import get_plugins
        from k2_core.trainstate import load_weights
        from k2_data.inference.engine import Engine, SamplingParams

        from .checkpoints import TokenizerBesideHooks, attach_hooks
        from .data_ranks import DataRanks
        from .prompts import PromptStream
        from .rl_eval import prompt_encoder
        from .rollout import RolloutManager
        from .weight_sync import InProcessSync, VersionGate

        cfg, opts, tokenizer = prepare_rl_config(cfg)
        self.cfg, self.opts, self.tokenizer, self.progress = cfg, opts, tokenizer, progress
        self.plugins = get_plugins()
        self.run = run = build_run(cfg, self.plugins)
        self.ranks = DataRanks(run.backend)
        if run.step == 0:  # a fresh run starts from the init weights; a resumed one has its own
            load_weights(opts.init, run.model)  # each rank reads only what it holds
        rl_state = run.resumed_attrs.get("rl_state")
        attach_hooks(self.plugins, TokenizerBesideHooks(tokenizer), "k2-rl-tokenizer")
        reg = self.plugins.registry
        self.rewards = {
            t.name: reg.build(
                "reward",
                t.reward,
                options=t.reward_options,
                where=f"plugins.rl.tasks.{t.name}.reward_options",
            )
            for t in opts.tasks
        }
        # before any engine starts: a code reward without namespaces is refused unless allowed
        self.sandbox_protections = sandbox_protections(
            self.rewards, allow_weak_isolation=opts.allow_weak_isolation
        )
        if self.ranks.distributed:
            from .data_ranks import build_engines

            self.engine, self.sync = build_engines(cfg, opts, run, tokenizer, self.ranks)
        elif opts.engine == "process":
            from .engine_process import ProcessSync, RemoteEngine

            # the child builds its own model; its first weights come by the same broadcast
            self.engine: Any = RemoteEngine(
                cfg.model,
                cfg.moe,
                opts.tokenizer,
                model=run.model,
                version=run.step,
                tokenizer=tokenizer,
                max_batch_size=opts.max_batch_size,
                timeout_s=opts.engine_timeout_s,
                bucket_mb=opts.sync_bucket_mb,
            )
            self.sync: Any = ProcessSync(self.engine)
        elif opts.engine == "openai":
            from .engine_openai import OpenAIEngine

            # a running server; its first weights come by the same checked update (below)
            self.engine = OpenAIEngine(
                opts.openai,
                tokenizer=tokenizer,
                version=run.step,
                check_served_version=opts.openai.weight_update in ("k2", "k2-push"),
            )
        else:
            # the engine owns a separate copy of the weights: rollouts see exactly one version
            engine_model = K2ForCausalLM(cfg.model, cfg.moe, reg, init_weights=False)
            engine_model.load_state_dict(run.model.state_dict())
            self.engine = Engine(engine_model, tokenizer, max_batch_size=opts.max_batch_size)
            self.sync = InProcessSync(self.engine)
            self.engine.version = run.step
        try:  # a failure from here on must not leave an engine process behind
            self.stop_ids = set(self.engine.default_stop_ids)
            top_p = opts.top_p

            def make_params(*, temperature: float, max_new_tokens: int, seed: int | None) -> Any:
                return SamplingParams(
                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
                )

            self.rollouts = RolloutManager(
                self.engine,
                make_params,
                k=opts.k,
                segment_tokens=opts.segment_tokens if opts.partial_rollout else None,
                gate=VersionGate(opts.max_version_lag),
                partial=opts.partial_rollout,
            )
            self.prompts = PromptStream(
                opts.tasks,
                prompt_encoder(tokenizer),
                cfg.train.seed + opts.seed_offset,
                opts.default_budget,
            )
            if rl_state is not None:
                self.rollouts.load_state_dict(rl_state["rollout"])
                self.prompts.load_state_dict(rl_state["prompts"])
            if opts.engine == "openai":
                from .engine_openai import OpenAISync

                probe = PromptStream(
                    opts.tasks,
                    prompt_encoder(tokenizer),
                    cfg.train.seed + 7919,
                    opts.default_budget,
                    split="val",
                )
                self.sync = OpenAISync(
                    self.engine,
                    opts.openai.weights_dir or f"{run.run_dir.rstrip('/')}/engine-weights",
                    [next(probe)[1] for _ in range(opts.openai.check_prompts)],
                )
                self.sync.push(run.model, run.step)  # the engine starts on the trainer's weights
            self.algorithm = reg.build(
                "rl_algorithm",
                opts.algorithm,
                options=opts.algorithm_options,
                where="plugins.rl.algorithm_options",
            )
            self.ptx = iter(run.loader) if opts.ptx_weight > 0 else None
            self.history: list[dict[str, float]] = []
            self.critic, self.critic_trainer = self._build_critic(cfg, opts, reg, tokenizer)
        except BaseException:
            self.close()
            raise

    def _build_critic(
        self, cfg: RunConfig, opts: RlOptions, reg: Any, tokenizer: Any
    ) -> tuple[Any, Any]:
        """The closed-loop critic: configured, else a copy of the initial policy (own weights)."""
        if not opts.critic.enabled:
            return None, None
        from k2_core.model import K2ForCausalLM
        from k2_data.inference.engine import Engine

        from .critic import CriticTrainer, EngineJudge

        critic = reg.build(
            "reward",
            "rubric_critic",
            options=opts.critic.reward_options,
            where="plugins.rl.critic.reward_options",
        )
        trainer = None
        if critic.judge is None:
            model = K2ForCausalLM(cfg.model, cfg.moe, reg, init_weights=False)
            # the trainer's weights equal the engine's here (a process engine has no .model)
            model.load_state_dict(self.run.model.state_dict())
            engine = Engine(model, tokenizer, max_batch_size=opts.max_batch_size)
            critic.judge = EngineJudge(engine, tokenizer, critic.options.max_tokens)
            trainer = CriticTrainer(model, tokenizer, opts.critic.lr)
        elif isinstance(critic.judge, EngineJudge):
            trainer = CriticTrainer(critic.judge.engine.model, tokenizer, opts.critic.lr)
        return critic, trainer

    def critic_loop(self, scored: list[dict[str, Any]]) -> dict[str, float]:
        """Judge each group with the critic, check it against the verifiable outcomes, train it."""
        from .critic import check_against

        by_group: dict[int, list[dict[str, Any]]] = {}
        for s in scored:
            by_group.setdefault(s["traj"].group, []).append(s)
        checked = agreed = 0
        sft: list[list[dict[str, str]]] = []
        for items in by_group.values():
            passed = [s["result"].outcome == "pass" for s in items]
            if all(passed) or not any(passed):
                continue  # no pair with a known right verdict
            self.critic.compare(items[0]["traj"].prompt, [s["text"] for s in items])
            rep = check_against(self.critic, passed)
            checked, agreed, sft = (
                checked + rep.checked,
                agreed + rep.agreed,
                sft + rep.sft_conversations,
            )
        m = {
            "critic/checked_pairs": float(checked),
            "critic/agreement": agreed / checked if checked else float("nan"),
        }
        if self.critic_trainer is not None and sft:
            m["critic/sft_loss"] = self.critic_trainer.step(sft)
        return m

    # --- one iteration -------------------------------------------------------------------
    def rollout(self, temperature: float) -> tuple[list[list[Any]], Any]:
        """Roll out until some groups are complete; returns (groups, stats)."""
        from .rollout import RolloutStats

        stats = RolloutStats()
        seed = self.cfg.train.seed * 1_000_003 + self.run.step + self.opts.seed_offset
        per_iter = self.opts.prompts_per_iter
        # partial rollout: every segment starts `prompts_per_iter` new groups beside the paused
        # ones (up to twice that in flight), so long responses finish in a later iteration
        # under a newer policy instead of stalling this one
        cap = 2 * per_iter if self.rollouts.partial and self.rollouts.segment_tokens else per_iter
        groups: list[list[Any]] = []
        for attempt in range(64):
            want = min(per_iter, cap - self.rollouts.groups_in_flight())
            if want > 0:
                self.rollouts.add_prompts(self.prompts, want, stats)
            groups += self.rollouts.step(temperature, seed * 64 + attempt, stats)
            if groups:
                break
        return groups, stats

    def score(self, groups: list[list[Any]]) -> list[dict[str, Any]]:
        """Each response as a dict: trajectory, text, reward result, final reward (and `own`:
        whether this data rank scored it, and trains on it). Group i is scored by data rank
        i mod world; every rank gets every group's scores."""
        from .budget import penalised

        mine: list[list[dict[str, Any]]] = []
        for i in self.ranks.mine(len(groups)):
            g = groups[i]
            texts = [self._text(t) for t in g]
            results = self.rewards[g[0].task].score(g[0].prompt, texts)
            mine.append(
                [
                    {
                        "traj": t,
                        "text": text,
                        "result": res,
                        "reward": penalised(
                            float(res.score), t.over_budget, self.opts.over_budget_penalty
                        ),
                    }
                    for t, text, res in zip(g, texts, results, strict=True)
                ]
            )
        scored: list[list[dict[str, Any]]] = [[] for _ in groups]
        for rank, theirs in enumerate(self.ranks.gather(mine)):
            for i, items in zip(range(rank, len(groups), self.ranks.world), theirs, strict=True):
                scored[i] = [{**s, "own": rank == self.ranks.rank} for s in items]
        return [s for items in scored for s in items]

    def _text(self, t: Any) -> str:
        from .rl_eval import response_text

        return response_text(self.tokenizer, t.token_ids, self.stop_ids)

    def train_step(self, scored: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step of the K1.5 objective (+ PTX) on the scored responses: this data
        rank's forward/backward on the responses it scored, then the backend's reduction."""
        from k2_core.orchestrator import apply_update

        from .objective import advantages

        run, opts, ranks = self.run, self.opts, self.ranks
        model = run.model
        trajs = [s["traj"] for s in scored]
        group_ids = {g: i for i, g in enumerate(dict.fromkeys(t.group for t in trajs))}
        groups = torch.tensor([group_ids[t.group] for t in trajs])
        rewards = torch.tensor([s["reward"] for s in scored])
        valid = torch.tensor([not s["result"].excluded for s in scored])
        adv = advantages(rewards, groups, valid)  # over every rank's groups: the same everywhere
        model.train()
        model.set_record_max_logits(True)
        model.reset_max_logits()
        own = [i for i, s in enumerate(scored) if s.get("own", True)]
        own.sort(key=lambda i: len(trajs[i].prompt_ids) + len(trajs[i].token_ids))
        chunks = [
            own[a : a + opts.micro_batch_size] for a in range(0, len(own), opts.micro_batch_size)
        ]
        micro = [m for m in chunks if bool(adv.valid[m].any())]  # all-excluded ones train nothing
        # [loss, entropy sum, entropy tokens, tokens] and each sample's log-ratio, summed over ranks
        sums, ratio = torch.zeros(4, dtype=torch.float64), torch.zeros(len(trajs))
        t0 = time.perf_counter()
        # every rank runs as many forwards as the busiest (expert parallelism's all-to-alls)
        for k in range(ranks.max_int(len(micro)) if ranks.distributed else len(micro)):
            if k < len(micro):
                self._micro_step(micro[k], trajs, adv, sums, ratio)
            else:
                self._padding_step()
        ptx_loss = self._ptx_step(sums) if self.ptx is not None else float("nan")
        # the backend averages the loss over the data ranks like the gradients, so each
        # reports its share times the ranks: the mean is the loss of all responses
        loss_mean, grad_norm = run.backend.finish_step(
            run, torch.tensor(sums[0].item() * ranks.world)
        )
        apply_update(run, loss_mean, grad_norm)
        secs = time.perf_counter() - t0
        ranks.sum_(sums)
        ranks.sum_(ratio)
        stats = getattr(run.optimizer, "last_clip_stats", None) or {}
        v = adv.valid
        return {
            "rl/loss": float(loss_mean),
            "rl/ptx_loss": ptx_loss,
            "train/grad_norm": float(grad_norm),
            "rl/entropy": float(sums[1] / max(float(sums[2]), 1.0)),
            "rl/log_ratio_mean": float(ratio[v].mean()) if bool(v.any()) else 0.0,
            "rl/advantage_abs_mean": float(adv.advantage[v].abs().mean()) if bool(v.any()) else 0.0,
            "qk_clip/heads_clipped": float(stats.get("heads_clipped", 0)),
            "train/tokens_per_s": float(sums[3]) / max(secs, 1e-9),
            "time/train_s": secs,
            "train/lr": run.scheduler.get_last_lr()[0],
        }

    def _ptx_step(self, sums: torch.Tensor) -> float:
        """The PTX loss on `train.grad_accum` batches of this rank's `data` shard (the mean of
        their means, as pre-training averages micro-batches and the backend data ranks);
        returns it averaged over the data ranks."""
        run, accum = self.run, self.cfg.train.grad_accum
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(accum):
            batch = {k: v.to(run.backend.device) for k, v in next(self.ptx).items()}
            with run.backend.autocast(self.cfg.train.bf16):
                loss = run.model(**batch, return_logits=False).loss
            (self.opts.ptx_weight * loss / accum).backward()
            total += float(loss.detach()) / accum
            sums[3] += int(batch["input_ids"].numel())
        return float(self.ranks.sum_(total)) / self.ranks.world

    def _micro_step(
        self, idx: list[int], trajs: list[Any], adv: Any, sums: torch.Tensor, ratio: torch.Tensor
    ) -> None:
        """Forward/backward of one micro-batch of responses; its statistics into sums/ratio."""
        from .objective import sequence_logprob, token_logprobs

        pad = self.tokenizer.pad_id
        seqs = [trajs[i].prompt_ids + trajs[i].token_ids for i in idx]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.bool)
        old = torch.zeros(len(idx))
        for row, i in enumerate(idx):
            ids[row, : len(seqs[row])] = torch.tensor(seqs[row])
            mask[row, len(trajs[i].prompt_ids) : len(seqs[row])] = True
            old[row] = sum(trajs[i].logprobs)
        dev = self.run.backend.device
        with self.run.backend.autocast(self.cfg.train.bf16):
            lp, ent = token_logprobs(self.run.model, ids.to(dev), mask.to(dev))
        logp = sequence_logprob(lp.float(), mask.to(dev)).cpu()
        index = torch.tensor(idx)
        # each rank's share of the sum, times the ranks: the backend's gradient average undoes it
        loss = self.algorithm.loss(logp, old, adv, index=index) * self.ranks.world
        loss.backward()
        sums[0] += float(loss.detach()) / self.ranks.world
        sums[1] += float(ent.sum())
        sums[2] += int(mask.sum())
        sums[3] += int(mask.sum()) + sum(len(trajs[i].prompt_ids) for i in idx)
        ratio[index] = logp.detach() - old

    def _padding_step(self) -> None:
        """A forward/backward that changes nothing, for a rank with fewer micro-batches than
        another (expert parallelism needs every rank in each all-to-all): eval mode counts no
        expert load, the max logits are not recorded, the loss is multiplied by zero."""
        model = self.run.model
        ids = torch.full(
            (1, 2), self.tokenizer.pad_id, dtype=torch.long, device=self.run.backend.device
        )
        model.eval()
        model.set_record_max_logits(False)
        try:
            with self.run.backend.autocast(self.cfg.train.bf16):
                out = model(ids, return_logits=True).logits
            (out.float().sum() * 0.0).backward()
        finally:
            model.train()
            model.set_record_max_logits(True)

    def iteration(self) -> dict[str, float]:
        """One rollout / reward / train / sync iteration; returns its metrics."""
        from .temperature import temperature_at

        opts, run = self.opts, self.run
        temp = temperature_at(
            run.step,
            self.cfg.train.steps,
            opts.temperature_start,
            opts.temperature_end,
            opts.temperature_schedule,
        )
        groups, rstats = self.rollout(temp)
        t0 = time.perf_counter()
        scored = self.score(groups)
        reward_s = time.perf_counter() - t0
        m = self.train_step(scored)
        if self.critic is not None and run.step % opts.critic.every == 0:
            m.update(self.critic_loop(scored))
        run.step += 1
        self.sync.push(run.model, run.step)
        m.update(_reward_metrics(scored))
        m.update(
            {
                "rl/temperature": temp,
                "rl/groups": float(len(groups)),
                "rl/paused": float(rstats.paused),
                "rl/resumed": float(rstats.resumed),
                "rl/refused_stale_groups": float(rstats.refused_groups),
                "rollout/failed_samples": float(rstats.failed_samples),
                "rollout/tokens_per_s": rstats.tokens_per_s,
                "time/rollout_s": rstats.seconds,
                "time/reward_s": reward_s,
                "time/sync_s": self.sync.last_seconds,
                "sync/mb_per_s": self.sync.last_bytes / 2**20 / max(self.sync.last_seconds, 1e-9),
            }
        )
        return m

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1 on held-out prompts of each task (val split)."""
        from .rl_eval import pass_at_1

        out = {}
        for t in self.opts.tasks:
            r = pass_at_1(
                self.engine,
                self.tokenizer,
                t,
                self.rewards[t.name],
                n=self.opts.eval_prompts,
                max_tokens=t.budget or self.opts.default_budget,
                split="val",
                seed=self.cfg.train.seed,
            )
            out[f"eval/{t.name}/pass_at_1"] = r["pass@1"]
        return out

    def save(self) -> str:
        """Checkpoint the run with the rollout buffer and the prompt position (the backend's
        layout-free checkpoint: every rank writes its share; the rollout state is the same on
        every rank)."""
        run = self.run
        uri = run.backend.save_train_state(
            run.checkpoint_root,
            run.step,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            loader=run.loader,
            keep=self.cfg.checkpoint.keep,
            attrs={
                "tracking_run_id": run.tracking_run_id,
                "run_config": self.cfg.model_dump(mode="json"),
                "rl_state": {
                    "rollout": self.rollouts.state_dict(),
                    "prompts": self.prompts.state_dict(),
                },
            },
        )
        run.plugins.hook.k2_on_checkpoint(run=run, step=run.step, uri=uri)
        return uri

    def train(self) -> dict[str, Any]:
        """Run the iterations up to train.steps; returns a summary."""
        cfg, run, hook = self.cfg, self.run, self.plugins.hook
        hook.k2_on_run_start(run=run)
        log_protections(run, self.sandbox_protections)
        status = "FAILED"
        t_start = time.perf_counter()
        try:
            if cfg.train.eval_every and self.opts.eval_prompts and run.step == 0:
                first = self.evaluate()
                hook.k2_on_step_end(run=run, step=0, metrics=first)
                self.history.append({"step": 0, **first})
            while run.step < cfg.train.steps:
                m = self.iteration()
                if (
                    cfg.train.eval_every
                    and self.opts.eval_prompts
                    and (run.step % cfg.train.eval_every == 0 or run.step == cfg.train.steps)
                ):
                    m.update(self.evaluate())
                hook.k2_on_step_end(run=run, step=run.step, metrics=m)
                self.history.append({"step": run.step, **m})
                if self.progress is not None and run.backend.rank == 0:
                    self.progress(run.step, m)
                if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps:
                    self.save()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                hook.k2_on_run_end(run=run, status=status)
            finally:
                self.close()
        return self.summary(time.perf_counter() - t_start)

    def close(self) -> None:
        """End the rollout engine's process, if it has one (idempotent; train() calls it)."""
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()

    def summary(self, seconds: float) -> dict[str, Any]:
        """Steps, reward first/last, held-out pass@1 first/last, where things are."""
        rewards = [h["rl/reward_mean"] for h in self.history if "rl/reward_mean" in h]
        evals = {
            t.name: [
                h[f"eval/{t.name}/pass_at_1"]
                for h in self.history
                if f"eval/{t.name}/pass_at_1" in h
            ]
            for t in self.opts.tasks
        }
        return {
            "steps": self.run.step,
            "seconds": seconds,
            "first_reward": rewards[0] if rewards else None,
            "last_reward": rewards[-1] if rewards else None,
            "pass@1": {k: (v[0], v[-1]) for k, v in evals.items() if v},
            "run_dir": self.run.run_dir,
            "tracking_run_id": self.run.tracking_run_id,
            "rank": self.run.backend.rank,
        }


def _reward_metrics(scored: list[dict[str, Any]]) -> dict[str, float]:
    """Reward mean/std, pass rate, length, truncation and exclusions, overall and by task."""
    m: dict[str, float] = {}
    by_task: dict[str, list[dict[str, Any]]] = {"": scored}
    for s in scored:
        by_task.setdefault(s["traj"].task, []).append(s)
    for task, items in by_task.items():
        p = "rl/" + (f"{task}/" if task else "")
        r = [s["reward"] for s in items]
        m[p + "reward_mean"] = statistics.fmean(r) if r else 0.0
        m[p + "reward_std"] = statistics.pstdev(r) if len(r) > 1 else 0.0
        m[p + "pass_rate"] = sum(s["result"].outcome == "pass" for s in items) / max(len(items), 1)
        m[p + "response_tokens"] = (
            statistics.fmean(len(s["traj"].token_ids) for s in items) if items else 0.0
        )
        m[p + "truncated_rate"] = sum(s["traj"].over_budget for s in items) / max(len(items), 1)
        m[p + "excluded"] = float(sum(s["result"].excluded for s in items))
    return m


def run_rl(
    cfg: RunConfig, progress: Callable[[int, dict[str, float]], None] | None = None
) -> dict[str, Any]:
    """Run the `rl` stage under `cfg`; returns the summary."""
    return RLTrainer(cfg, progress).train()


def build_rl_stage(*, options: Any) -> Any:
    """The `rl` stage: a callable RunConfig -> summary."""
    return run_rl

"""Configuration schemas. Values live in YAML under conf/; these dataclasses give them types,
defaults and one comment per field, and are registered in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from hpc_executor.llm.base import LLMSpec


@dataclass
class RewardConfig:
    metric: str = MISSING  # key in the evaluator's metrics JSON
    transform: str = "identity"  # identity | reciprocal | negate: reward = f(metric)
    direction: str = "maximize"  # the reward is always maximised; kept explicit for readers
    baseline: float = MISSING  # reward of the unmodified baseline (measured)
    metric_min: float | None = None  # metric outside [min, max] -> invalid_result (reward hacks)
    metric_max: float | None = None


@dataclass
class ResourcesConfig:
    gpus: int = 0  # GPUs per trial; 8 takes a whole node
    cpus: int = 1  # CPU threads per trial
    mem_gb: int = 4  # memory per trial


@dataclass
class LimitsConfig:
    """What one trial may use of its node (README: what is and is not enforced where)."""

    max_file_gb: float = 64.0  # the largest file a trial may write (RLIMIT_FSIZE); 0 = the node's
    max_processes: int = 8192  # its processes and threads (RLIMIT_NPROC; sandbox=bwrap only); 0 = the node's
    max_open_files: int = 65536  # RLIMIT_NOFILE, at most the node's hard limit; 0 = the node's
    tmp_gb: float = 16.0  # size cap of the private /tmp and HOME under bwrap (tmpfs: memory); 0 = none


@dataclass
class EnvConfig:
    name: str = MISSING
    description: str = ""  # what the environment is, for the ideator's prompt
    dir: str = MISSING  # environment directory, absolute or relative to the repository root
    baseline: str = "baseline"  # subdirectory copied fresh into every workspace
    editable: list[str] = field(default_factory=list)  # globs (relative to baseline/) ideas may change
    protected: list[str] = field(default_factory=list)  # frozen files, byte-checked after each run
    hidden_from_implementer: list[str] = field(default_factory=list)  # not shown in implementer prompts
    run_command: list[str] = MISSING  # argv; {python} {gpus} {cpus} are substituted
    eval_command: list[str] = MISSING  # argv, run in a pristine copy of baseline/
    data_dir: str = "data"  # relative to dir, or absolute
    prepare_command: list[str] | None = None  # builds data_dir (cwd baseline/)
    auto_prepare: bool = False  # cheap and offline: the driver runs prepare_command when data is missing
    requires: list[str] = field(default_factory=list)  # files under data_dir that must exist
    eval_data: list[str] = field(default_factory=list)  # files under data_dir the evaluator reads: hashed at
    # the run's start and checked before every evaluation, since trials could write to them
    eval_only: list[str] = field(default_factory=list)  # files or globs under data_dir that training must
    # not see (sandbox=bwrap leaves them out of its view): the test split; hashed and checked like eval_data
    network: bool = False  # the trial may reach the network (sandbox=bwrap; else only its own loopback)
    read_only_paths: list[str] = field(default_factory=list)  # more paths a sandboxed trial may read
    # (a model cache, a site's software tree); the system, Python and HF_HOME are there already
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    extra_env: dict[str, str] = field(default_factory=dict)  # extra variables for run and eval
    catalog: str | None = None  # idea catalog for the offline stand-in, relative to dir
    reward: RewardConfig = field(default_factory=RewardConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    budget_s: int = MISSING  # training budget, exported as HPCX_TIME_BUDGET_S
    hard_limit_s: int = MISSING  # the worker kills the trial's process group here
    # The worker enforces the budget itself: it kills training at budget_s + save_margin_s (the time
    # to write the model after the budget), or at hard_limit_s if that comes first; None: hard_limit_s only
    save_margin_s: int | None = None
    eval_limit_s: int = 600  # the same for the frozen evaluator


@dataclass
class ServeConfig:
    """An open model served for the run as a job of its own (vLLM by default): started when an epoch
    has calls to make, health-checked, used through its OpenAI-compatible API, cancelled when the
    epoch's calls are done."""

    enabled: bool = False  # false: use base_url as it is (a server someone else runs)
    # argv; {model}, {port} and {gpus} are substituted. The job picks a free port on its node.
    command: list[str] = field(default_factory=lambda: ["vllm", "serve", "{model}", "--port", "{port}",
                                                        "--tensor-parallel-size", "{gpus}"])  # fmt: skip
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 64
    time_limit_min: int = 1440  # the job's time limit: the longest the run may use the server
    startup_timeout_s: float = 1800.0  # queueing plus loading the weights
    health_path: str = "/health"  # vLLM's; relative to the server's root, not to /v1
    # false: the server is stopped while an epoch's trials run and started again for the next epoch's
    # calls (its GPUs go to other jobs meanwhile); true: it stays up, saving a start per epoch
    keep_alive: bool = False


@dataclass
class LLMConfig(LLMSpec):
    """One role's model (see LLMSpec for every field), plus what only the ideator's prompts use."""

    provider: str = MISSING  # anthropic | openai | openai_compatible | offline
    model: str = MISSING
    thinking_budget_search: int = 0  # thinking budget for exploit/explore calls (paper: 1500; epoch 0: 3000)
    serve: ServeConfig = field(default_factory=ServeConfig)


@dataclass
class ModelConfig:
    name: str = MISSING
    ideator: LLMConfig = field(default_factory=LLMConfig)
    implementer: LLMConfig = field(default_factory=LLMConfig)
    samples: int = 10  # diffs sampled in parallel per idea (paper: 10)
    revisions: int = 2  # revisions per sample with the error fed back (paper: 2)
    # strategy=rl's policy: {backend: transformers | vllm | tinker | <module>:<Class>, model: <path, hub
    # id or "tiny">, plus the keys the backend documents}; empty for the other strategies
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    name: str = MISSING  # evolution | best_of_n | rl (RLStrategyConfig)
    epochs: int = 10
    batch_size: int = 50  # ideas per epoch (paper: 50 GRPO, 80 nanoGPT)
    call_size: int = 10  # ideas per ideator call (paper: 10)
    max_shown: int = 100  # ideas shown in exploit/explore prompts (paper: 100)
    exploit_start: float = 0.5  # exploit share at epoch 1; +exploit_step every 2 epochs
    exploit_step: float = 0.1
    exploit_max: float = 0.8
    # barrier: epoch by epoch, each waiting for its last trial (the paper's loop); steady: no barrier,
    # every trial slot stays busy while ideation and implementation run ahead (see README)
    schedule: str = "barrier"
    ready_buffer: int = 2  # steady: patches kept ready beyond the free slots


@dataclass
class LengthRewardConfig:
    """The paper's length reward: + per_char per character of thinking, at most cap."""

    enabled: bool = False
    cap: float = 0.3  # paper: 0.3
    per_char: float = 0.0001


@dataclass
class PenaltyConfig:
    """A mitigation that adds (or subtracts) coef times a similarity score to a sample's reward."""

    enabled: bool = False
    coef: float = 0.5


@dataclass
class FitnessSharingConfig:
    """Divides an executed idea's reward by its number of near-duplicates in the step, to a power."""

    enabled: bool = False
    exponent: float = 1.0


@dataclass
class MitigationsConfig:
    """Reward shaping against the collapse onto a few easy ideas (README, "RL on the ideator")."""

    length_reward: LengthRewardConfig = field(default_factory=LengthRewardConfig)  # the paper's
    jaccard_penalty: PenaltyConfig = field(default_factory=PenaltyConfig)  # the paper's: vs the previous step
    novelty_bonus: PenaltyConfig = field(default_factory=PenaltyConfig)  # ours: far from every earlier idea
    # ours: reward shared among the step's near-duplicates
    fitness_sharing: FitnessSharingConfig = field(default_factory=FitnessSharingConfig)


@dataclass
class RLStrategyConfig(StrategyConfig):
    """strategy=rl (hpc_executor/rl/loop.py): per step, a group of ideas sampled from the policy with one
    prompt, each implemented and run, rewarded, and one policy-gradient step. ``steps`` and
    ``group_size`` count it; ``epochs`` and ``batch_size`` are set to them (an environment preset's
    evolution batch does not apply)."""

    name: str = "rl"
    steps: int = 4  # RL steps (the paper ran 68+ epochs)
    group_size: int = 4  # samples per step (paper: 128 nanoGPT, 256 GRPO: strategy.group_size=128)
    loss: str = "grpo_clip"  # grpo_clip | reinforce (importance-sampled over the recorded tokens)
    advantage: str = "grpo"  # grpo | reinforce | max_at_k (hpc_executor/rl/advantages.py)
    max_at_k: int = 4  # k of the max_at_k advantage
    learning_rate: float = 4e-5
    clip_eps: float = 0.2  # GRPO-clip's ratio clip
    kl_coef: float = 0.0  # KL penalty towards the base model (paper: none)
    lora_rank: int = 32
    updates_per_step: int = 1  # optimiser steps over each step's samples (paper: 1; PPO's epochs)
    temperature: float = 1.0  # sampling temperature (paper: 1.0)
    max_tokens: int = 2048  # per sample, thinking included
    # reward / measured baseline reward (1.0: as good as the baseline; failed ideas stay 0)
    reward_relative_to_baseline: bool = False
    mitigations: MitigationsConfig = field(default_factory=MitigationsConfig)


@dataclass
class SchedulerConfig:
    """What every scheduler takes (``hpc_executor/scheduling/``); each backend's own fields are in its
    subclass, whose schema its conf/scheduler/*.yaml file names."""

    name: str = MISSING  # local | slurm: the backend
    max_parallel: int = 0  # trials in flight at once; 0 = as many as the resources allow (Slurm: its queue)
    result_poll_s: float = 1.0  # how often open trials' result files are looked for (a stat each)
    poll_interval_s: float = 1.0  # how often the scheduler is asked at first; backs off while nothing changes
    poll_interval_max_s: float = 10.0
    result_grace_s: float = 15.0  # a job that ended gets this long for its result file to appear
    vanished_grace_s: float = 120.0  # a job the scheduler has no record of is resubmitted after this


@dataclass
class LocalSchedulerConfig(SchedulerConfig):
    """Trials as processes on this machine (submitit's LocalExecutor)."""

    name: str = "local"
    kill_wait_s: float = 10.0  # cancel: SIGTERM, then SIGKILL this much later (Slurm's KillWait)


@dataclass
class SlurmSchedulerConfig(SchedulerConfig):
    """Trials as Slurm array jobs (submitit's SlurmExecutor)."""

    name: str = "slurm"
    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint (node features, e.g. h100)
    gpus_per_node: int = 8  # a trial asking for this many GPUs takes a whole node (--exclusive)
    cpus_per_gpu: int | None = None  # per-trial CPUs = max(env.resources.cpus, cpus_per_gpu x GPUs)
    mem_gb_per_gpu: int | None = None  # likewise for memory
    time_margin_min: int = 10  # added to the environment's hard limit for Slurm's --time
    time_limit_min: int | None = None  # Slurm's --time outright (default: hard limit + eval limit + margin)
    job_name: str = "hpcx"  # sbatch --job-name (shows in squeue)
    setup: list[str] = field(default_factory=list)  # lines run before the worker (module load ...)
    max_array_parallel: int = 0  # %P in --array=0-N%P; 0 = no cap
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra sbatch flags


@dataclass
class NoiseConfig:
    """How noisy the baseline is, and the bar an idea must clear to beat it (hpc_executor/noise.py)."""

    baseline_repeats: int = 1  # runs of the unmodified baseline in epoch 0, on distinct seeds
    repeat_every: int = 0  # run the baseline_repeats again every this many epochs (0: epoch 0 only)
    k: float = 2.0  # an idea beats the baseline above mean + k * std of the baseline's runs


@dataclass
class ConfirmConfig:
    """Re-running the search's winners on fresh seeds at its end (hpc_executor/confirm.py)."""

    top_k: int = 0  # ideas (best reward first) to confirm; 0: none (costs top_k * seeds trials)
    seeds: int = 2  # fresh seeds per confirmed idea


@dataclass
class NoveltyConfig:
    """Dropping new ideas too close to earlier ones before they are implemented (hpc_executor/diversity.py)."""

    enabled: bool = False
    method: str = "auto"  # auto (embeddings where installed, else jaccard) | jaccard | embedding
    threshold: float | None = None  # similarity at or above which an idea is dropped (default per method)


@dataclass
class ReportConfig:
    """The HTML report the search writes at its end (hpc_executor/report.py)."""

    enabled: bool = True
    similarity: str = "auto"  # idea diversity from: auto (embeddings where installed, and jaccard) | jaccard


@dataclass
class SearchConfig:
    env: EnvConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    # typed by the chosen scheduler/ file's schema (local_schema: LocalSchedulerConfig, slurm_schema:
    # SlurmSchedulerConfig); Any here, so that a recorded config of either backend merges back
    scheduler: Any = MISSING
    run_name: str = MISSING  # the run directory's name; the same name resumes the same run
    seed: int = 0
    budget_usd: float | None = None  # LLM spend of the whole run; once reached, no new calls start
    budget_gpu_hours: float | None = None  # GPU-hours of the run's trials; once reached, no new trials start
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    novelty: NoveltyConfig = field(default_factory=NoveltyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    run_baseline: bool = True  # run the unmodified baseline as a trial of epoch 0 (measured reference)
    isolate_pids: str = "auto"  # trials in their own PID namespace where permitted: auto | on | off
    snapshot_interval_s: float = 30.0  # the ledger's snapshot for readers on other hosts is renewed at most
    # this often while the run changes, and always when the driver stops (see README, "Reading a run from another host")
    # bwrap: trials see only their workspace, output and data (README "Trial sandbox"); auto: bwrap
    # where it works here, else none (said in the plan, at start and in every trial's provenance)
    sandbox: str = "auto"
    keep_workspaces: bool = False  # keep each trial's workspace after it ran (diffs and logs are kept)
    check_only: bool = False  # compose, preflight and print the plan, then stop
    dry_run: bool = False  # print what an epoch would submit (Slurm: its sbatch script), then stop


def register_configs() -> None:
    """The primary schema types every group's values (they are merged under its keys); the scheduler
    group's files are typed by their backend's schema."""
    from hydra.core.config_store import ConfigStore  # here: workers import the schemas, not Hydra

    store = ConfigStore.instance()
    store.store(name="search_schema", node=SearchConfig)
    store.store(group="strategy", name="rl_schema", node=RLStrategyConfig)
    # each backend's schema, named in the defaults of its conf/scheduler/*.yaml files
    store.store(group="scheduler", name="local_schema", node=LocalSchedulerConfig)
    store.store(group="scheduler", name="slurm_schema", node=SlurmSchedulerConfig)

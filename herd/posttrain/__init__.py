"""herd.posttrain: post-training on chat data: SFT, and the parts of reward models, DPO and PPO/GRPO.

- records.py  reading chat records: jsonl (.gz / .zst), JSON arrays, parquet, files or folders
- render.py   one record (TRL's conversational or prompt/completion format) -> ids + loss mask
- dataset.py  SFTDataConfig, build_sft_data: render, length handling, validation split -> SFTDataset
- report.py   DataReport: what was read, kept, truncated, dropped and why
- packing.py  best-fit packing into rows with document ids, SFTBatch, SFTBatchLoader, eval_batches
- lora.py     LoRAConfig, LoRALinear (peft's update rule), apply / merge / unmerge, frozen bf16 / int8 base
- adapter.py  adapters on disk in peft's layout (adapter_config.json + adapter_model.safetensors)
- config.py   FinetuneConfig (what every post-training loop shares) and SFTConfig, flat, the flags
- policy.py   load_policy: --init-from (+ LoRA) built straight into its parallel layout; frozen references
- resume.py   where a run starts, what must match on resume, trainable-only train state
- replies.py  held-out prompts and greedy chat replies (did each end with <|eot_id|>?)
- export.py   the end of a run: OUT/final in any format, or OUT/adapter (peft layout) [+ merged]
- sft.py      the SFT loop (`herd sft`);  synthetic.py  a stdlib docstring instruction set
- arithmetic.py  a verifiable task (small sums): SFT records, preference pairs, prompts, reward()
- reward_fn.py  --reward-fn MODULE:FUNCTION / FILE.py:FUNCTION loading; RewardFunction counts failures
- preference.py       one preference record (TRL's formats, Llama 3's ranked form) -> prompt + responses
- preference_data.py  PreferenceDataConfig, build_preference_data -> PreferenceDataset + PreferenceReport
- pairs.py    batches of preference examples (concat / shared-prompt rows), per-response log-probs
- losses.py   Bradley-Terry, DPO (sigmoid / ipo, label smoothing, length norm, Llama 3 mask), NLL term
- rl.py       PPO (clipped policy and value losses, GAE, KL penalties) and GRPO advantages
- prompts.py  prompt records -> chat messages + ids, train / held-out split (PPO / GRPO rollouts)
- rollout.py  replies sampled by the inference Engine on the training model, rewards, RolloutBatch,
              PolicyWithValue (policy + PPO's value head)
- ppo_config.py PPOConfig;  ppo.py  the GRPO / PPO loop (`herd ppo`);  ppo_cli.py its command
- reward.py   RewardModel (scalar head), saved as transformers' LlamaForSequenceClassification; scoring
- reward_train.py  RewardTrainConfig, train_reward: the reward-model loop (`herd reward`)
- rejection.py     RejectionConfig, rejection_sample: best of K replies per prompt as SFT data
                   (`herd rejection-sample`; one shared prefill per prompt through the engine)
- reference_cache.py  DPO's reference log-probs, computed once before training, on disk (resumable, keyed)
- dpo.py      DPOTrainConfig and the DPO loop (`herd dpo`, Llama 3's recipe);  dpo_cli.py  its command
- average.py  weighted averages of checkpoints, reward models and LoRA adapters
- cli.py      `herd sft`, `herd merge-lora`, `herd average`;  score_cli.py  `herd score`
- reward_cli.py  `herd reward`, `herd rejection-sample`

Names are imported lazily, so `import herd.posttrain` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataReport": "herd.posttrain.report",
    "data_files": "herd.posttrain.records",
    "iter_records": "herd.posttrain.records",
    "Conversation": "herd.posttrain.render",
    "RecordError": "herd.posttrain.render",
    "to_conversation": "herd.posttrain.render",
    "render": "herd.posttrain.render",
    "SFTDataConfig": "herd.posttrain.dataset",
    "SFTDataset": "herd.posttrain.dataset",
    "SFTData": "herd.posttrain.dataset",
    "build_sft_data": "herd.posttrain.dataset",
    "load_tokenizer_for": "herd.posttrain.dataset",
    "pack_bins": "herd.posttrain.packing",
    "SFTRows": "herd.posttrain.packing",
    "SFTBatch": "herd.posttrain.packing",
    "SFTBatchLoader": "herd.posttrain.packing",
    "collate": "herd.posttrain.packing",
    "eval_batches": "herd.posttrain.packing",
    "IGNORE_INDEX": "herd.posttrain.packing",
    "LoRAConfig": "herd.posttrain.lora",
    "LoRALinear": "herd.posttrain.lora",
    "apply_lora": "herd.posttrain.lora",
    "merge_lora": "herd.posttrain.lora",
    "unmerge_lora": "herd.posttrain.lora",
    "lora_modules": "herd.posttrain.lora",
    "lora_state_dict": "herd.posttrain.lora",
    "load_lora_state_dict": "herd.posttrain.lora",
    "mark_only_lora_trainable": "herd.posttrain.lora",
    "parameter_bytes": "herd.posttrain.lora",
    "FinetuneConfig": "herd.posttrain.config",
    "SFTConfig": "herd.posttrain.config",
    "load_policy": "herd.posttrain.policy",
    "policy_args": "herd.posttrain.policy",
    "heldout_prompts": "herd.posttrain.replies",
    "chat_replies": "herd.posttrain.replies",
    "export_policy": "herd.posttrain.export",
    "docstring_qa": "herd.posttrain.synthetic",
    "save_adapter": "herd.posttrain.adapter",
    "read_adapter": "herd.posttrain.adapter",
    "load_adapter": "herd.posttrain.adapter",
    "Preference": "herd.posttrain.preference",
    "RenderedPreference": "herd.posttrain.preference",
    "to_preference": "herd.posttrain.preference",
    "render_preference": "herd.posttrain.preference",
    "PreferenceDataConfig": "herd.posttrain.preference_data",
    "PreferenceDataset": "herd.posttrain.preference_data",
    "PreferenceData": "herd.posttrain.preference_data",
    "PreferenceReport": "herd.posttrain.preference_data",
    "build_preference_data": "herd.posttrain.preference_data",
    "PreferenceBatch": "herd.posttrain.pairs",
    "PreferenceBatchLoader": "herd.posttrain.pairs",
    "collate_preferences": "herd.posttrain.pairs",
    "response_logprobs": "herd.posttrain.pairs",
    "sequence_sums": "herd.posttrain.pairs",
    "bradley_terry_loss": "herd.posttrain.losses",
    "dpo_loss": "herd.posttrain.losses",
    "dpo_objective": "herd.posttrain.losses",
    "DPOConfig": "herd.posttrain.losses",
    "gae": "herd.posttrain.rl",
    "kl_penalty": "herd.posttrain.rl",
    "token_rewards": "herd.posttrain.rl",
    "ppo_policy_loss": "herd.posttrain.rl",
    "ppo_value_loss": "herd.posttrain.rl",
    "grpo_advantages": "herd.posttrain.rl",
    "RewardModel": "herd.posttrain.reward",
    "RewardScorer": "herd.posttrain.reward",
    "reward_model_from_checkpoint": "herd.posttrain.reward",
    "save_reward_model": "herd.posttrain.reward",
    "load_reward_model": "herd.posttrain.reward",
    "load_reward_scorer": "herd.posttrain.reward",
    "average_checkpoints": "herd.posttrain.average",
    "PPOConfig": "herd.posttrain.ppo_config",
    "build_prompts": "herd.posttrain.prompts",
    "PolicyWithValue": "herd.posttrain.rollout",
    "RolloutBatch": "herd.posttrain.rollout",
    "sample_replies": "herd.posttrain.rollout",
    "RewardTrainConfig": "herd.posttrain.reward_train",
    "train_reward": "herd.posttrain.reward_train",
    "RejectionConfig": "herd.posttrain.rejection",
    "rejection_sample": "herd.posttrain.rejection",
    "adapters_disabled": "herd.posttrain.lora",
    "DPOTrainConfig": "herd.posttrain.dpo",
    "ReferenceCache": "herd.posttrain.reference_cache",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd.posttrain' has no attribute {name!r}")

"""A reward plugin for the trainer tests (imported through --config.reward.plugins=reward_plugin).

A random tiny model never answers correctly, so the DeepEyes reward is 0 everywhere and an update would be a
no-op. This reward varies with the generated text, giving non-zero advantages and real gradient steps.
"""

import zlib

from deepeyes_jax.reward import rewards


@rewards.register_reward("test_text_hash", overwrite=True)
def text_hash_reward(response, ground_truth, *, num_successful_tool_calls=0, judge=None, question=None):
  value = (zlib.crc32(response.encode()) % 1000) / 1000.0
  return rewards.RewardResult(total=value, acc=float(value > 0.5), fmt=0.0, tool=0.0, answer=None)

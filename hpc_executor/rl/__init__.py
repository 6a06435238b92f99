"""RL from execution reward on the ideator (the paper's section 5): a policy that samples ideas,
is rewarded by running them, and is updated with a policy-gradient step."""

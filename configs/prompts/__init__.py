"""Built-in prompt sets for rollout jobs (`prompts_preset: NAME`), one jsonl file each."""

"""The label of a position without a target (padding, prompts, non-assistant turns): Hugging Face's and torch's
`ignore_index` convention, so tokenized data means the same to every loss."""

IGNORE_INDEX = -100

"""Stage 1: reference images -> concept crops -> captions -> a Hugging Face dataset."""

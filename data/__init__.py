"""Data pipeline: tokenizers, Megatron indexed datasets, SFT packing, RL prompt sets, filters, tasks.

- :mod:`data.tokenizer`   sentencepiece / HF tokenizers behind one interface; ``load_tokenizer("bundled")``
- :mod:`data.chat`        chat template with assistant-only loss masks
- :mod:`data.indexed`     Megatron ``.bin/.idx`` writer and memory-mapped reader
- :mod:`data.preprocess`  parallel streaming JSONL -> indexed dataset (``megatron-seed preprocess``)
- :mod:`data.gpt_dataset` fixed-length shuffled samples and weighted blending
- :mod:`data.pretrain`    ``build_pretrain_dataset`` and the resumable ``batch_iterator`` the trainer uses
- :mod:`data.sft`         conversations -> masked rows, packing with per-document positions, length-sorted batches
- :mod:`data.prompts`     RL prompt JSONL schema and the validating streaming loader
- :mod:`data.filters`     too easy / too hard / low variance prompt filtering rules
- :mod:`data.tasks`       procedural verifiable tasks (math, string puzzles, programs) and worked solutions
- :mod:`data.build_corpus` the generator of the bundled corpus ``data/corpus/bundled.txt``

This package never imports the model, the trainer or ``rl``; ranks and sizes are plain ints.
"""

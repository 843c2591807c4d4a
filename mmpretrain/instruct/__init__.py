"""Visual instruction tuning, LLaVA-style: our vision tower + an MLP projector + a transformers causal LM.

    template.py   LLaVA conversation JSON -> (input_ids, labels): chat template, image-token expansion, loss mask
    model.py      VisionLanguageModel (forward with the assistant-only loss, greedy generate), builders
    export.py     -> transformers LlavaForConditionalGeneration folder (key map + config)
    data.py       LLaVA JSON + image folder -> items (bad records skipped, counted by reason); collate
    vqa.py        the tiny twin's data: questions about the synthetic shapes, word-level tokenizer
    config.py     InstructConfig (stages, tower, LM, data)
    train.py      python -m mmpretrain.instruct CONFIG: the stages on mmpretrain.engine.build_engine, eval, export

What exists and what does not yet: docs/instruct.md.
"""

"""Visual instruction tuning, LLaVA-style: our vision tower + an MLP projector + a transformers causal LM.

    template.py   LLaVA conversation JSON -> (input_ids, labels): chat template, image-token expansion, loss mask
    model.py      VisionLanguageModel (forward with the assistant-only loss, greedy generate), builders
    export.py     -> transformers LlavaForConditionalGeneration folder (key map + config)

What exists and what does not yet: docs/instruct.md.
"""

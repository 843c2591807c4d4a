"""Visual instruction tuning, LLaVA-style: our vision tower + an MLP projector + a transformers causal LM.

    template.py   LLaVA conversation JSON -> (input_ids, labels): chat template, image-token expansion, loss mask
    model.py      VisionLanguageModel (forward with the assistant-only loss, greedy generate), builders
    export.py     -> transformers LlavaForConditionalGeneration folder (key map, config, processor); hf_parity
    data.py       LLaVA JSON + image folder, or conversation shards -> items (bad records counted by reason); collate
    lora.py       LoRA adapters on the LM (peft), merged before export
    chat.py       python -m mmpretrain.instruct.chat FOLDER: answer from a run folder (our model) or its export
    vqa.py        the tiny twin's data: questions about the synthetic shapes, word-level tokenizer
    config.py     InstructConfig (stages, tower, LM, data)
    train.py      python -m mmpretrain.instruct CONFIG: the stages on mmpretrain.engine.build_engine (ranks, ZeRO,
                  checkpoints, resume), eval, export

What exists and what does not yet: docs/instruct.md.
"""

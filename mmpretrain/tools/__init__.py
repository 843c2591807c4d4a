"""The command-line tools installed with the package (console scripts in setup.py):

    mmpretrain-make-shards    make_shards.py      images and captions -> WebDataset shards (train or zero-shot eval)
    mmpretrain-inspect-shards inspect_shards.py   counts, broken samples, caption / image-size histograms of shards
    mmpretrain-plot           plot_metrics.py     metrics.jsonl of one or more runs -> a PNG of curves

Each is also ``python -m mmpretrain.tools.<module>``, and ``python tools/<module>.py`` in a checkout (a shim).
The converter is ``mmpretrain-convert`` (mmpretrain/convert/cli.py); benchmarks stay in the checkout's tools/.
"""

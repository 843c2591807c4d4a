"""`python -m mmpretrain.instruct CONFIG [a.b=c ...]`: see mmpretrain/instruct/train.py."""

from mmpretrain.instruct.train import main

if __name__ == "__main__":
    main()

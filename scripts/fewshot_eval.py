"""Prompt-tune and evaluate CLIP models (open_clip) on few-shot protocols. With no arguments: the digits demo.

python scripts/fewshot_eval.py                                        # demo on CPU, a few minutes
python scripts/fewshot_eval.py --config configs/prompts/promptsrc_b2n.yaml \
    --model.init_args.pretrained /path/to/ViT-B-16.pt --data.dataset OxfordPets --data.root /data/coop
python scripts/fewshot_eval.py --print_config                          # every option, with its current value
"""

from prompts.fewshot import main

if __name__ == "__main__":
    main()

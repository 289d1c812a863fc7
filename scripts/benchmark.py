"""Speed and memory benchmarks: prints Markdown tables and writes JSON (default runs/benchmark/<suite>.json).

python scripts/benchmark.py agreement            # k-means (torch, faiss, scikit-learn) and Sinkhorn, a few minutes
python scripts/benchmark.py ssl3d                # deformable slice attention and JointSSL training steps
python scripts/benchmark.py all --quick          # small sizes: a smoke test in seconds
python scripts/benchmark.py ssl3d --device cuda  # adds the bf16 paper-config step and GPU utilisation
python scripts/benchmark.py prompts              # PromptSRC against IVLP training steps
python scripts/benchmark.py entities             # stages 2+3 on 300,000 faces against scikit-learn; video fps
python scripts/benchmark.py entities-eval        # entity discovery vs the official algorithm, held-out episodes
python scripts/benchmark.py entities-eval --split tuning --tune   # the grid the entity defaults were chosen from
python scripts/benchmark.py finetune             # fine-tuning steps and inference volumes/s

Compared variants are timed round-robin in one process and summarised by their median, so that load from other
jobs on a shared machine hits them alike.
"""

from benchmarks.cli import main

if __name__ == "__main__":
    main()

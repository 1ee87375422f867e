"""The biologist in the loop: which cells to check next (:mod:`.suggest`), the corrections a
biologist makes (:mod:`.corrections`, ``PRED_DIR/corrections.csv``) and fine-tuning a run's
cell model on them (:mod:`.finetune`). No Qt; the Review dock widget is a thin layer over these.
"""

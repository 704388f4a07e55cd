"""Tables from run outputs: zero-shot evaluation results (eval_table)."""

"""BERT, RoBERTa and DistilBERT encoders."""

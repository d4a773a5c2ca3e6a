"""LoCoRe training: lists from global neighbours, gallery shuffling, a resumable loop."""

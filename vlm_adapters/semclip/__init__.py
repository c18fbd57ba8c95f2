"""SemClip: question-relevant crops of an image, appended to the overview's tokens, no VLM retraining."""

"""Sources: indexable collections of sample records, one kind per module, and the file manifest."""

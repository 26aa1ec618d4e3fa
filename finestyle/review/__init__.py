"""`finestyle review`: a person looks at, fixes and approves a dataset's rows before training."""

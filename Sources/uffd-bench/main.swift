print("uffd-bench: to be written")

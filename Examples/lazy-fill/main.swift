import Userfaultfd
print("placeholder")

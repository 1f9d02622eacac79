# Shared by the guest benchmarks (sourced): the project's dependencies, guest image and release
# build, and `initrd NAME SCRIPT`, which appends SCRIPT as /test.sh to the guest's initramfs in
# "$work/NAME/initrd.gz" ($work is the caller's temporary directory).
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2

initrd() { # name script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$2" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
}

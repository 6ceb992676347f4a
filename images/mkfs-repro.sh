# shellcheck shell=bash
# mkfs_repro IMG SIZE LABEL UUID EPOCH SRCDIR: a reproducible ext4 image of SRCDIR (sourced by
# the build scripts). mkfs.ext4 -d copies each file's ctime, which `touch` cannot set, so after
# populating, every inode's ctime is rewritten to EPOCH with debugfs; the UUID, hash seed and
# creation time are fixed too. Inode tables and the journal are written now (not lazily by the
# first guest to mount it), so a fresh fork does not rewrite them.
mkfs_repro() {
    local img="$1" size="$2" label="$3" uuid="$4" epoch="$5" src="$6" cmds
    find "$src" -exec touch -h -d "@$epoch" {} +
    rm -f "$img"
    E2FSPROGS_FAKE_TIME="$epoch" mkfs.ext4 -q -F -L "$label" -b 4096 -U "$uuid" \
        -E "hash_seed=$uuid,lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0" \
        -d "$src" "$img" "$size" >&2
    cmds="$(mktemp)"
    _mkfs_repro_walk() {
        local dir="$1" ino mode name
        while IFS=/ read -r _ ino mode _ _ name _; do
            case "$name" in .|..|'') continue ;; esac
            echo "sif <$ino> ctime @$epoch"
            case "$mode" in 04*) _mkfs_repro_walk "${dir%/}/$name" ;; esac
        done < <(debugfs -R "ls -p $dir" "$img" 2>/dev/null)
    }
    { echo "sif <2> ctime @$epoch"; _mkfs_repro_walk /; } > "$cmds"
    E2FSPROGS_FAKE_TIME="$epoch" debugfs -w -f "$cmds" "$img" >/dev/null 2>&1
    rm -f "$cmds"
}

# Disk patterns shared by dom0 and the guests (POSIX sh + busybox awk; sourced, not run).
#
# A pattern is a sequence of 4 KiB blocks; block i of pattern SEED is the text
# "SEED block %08d " repeated, padded with dots to 4095 bytes, plus a newline. So every block is
# one line, names its pattern and its own index, and a block that landed in the wrong place, a
# torn block or a block from another pattern is told apart from the right one by plain text tools.

# pattern SEED BLOCKS [FIRST]: writes blocks FIRST..FIRST+BLOCKS-1 of pattern SEED to stdout.
pattern() {
  awk -v seed="$1" -v n="$2" -v first="${3:-0}" 'BEGIN {
    unit = sprintf("%s block XXXXXXXX ", seed)
    t = ""
    while (length(t) + length(unit) <= 4095) t = t unit
    while (length(t) < 4095) t = t "."
    for (b = first; b < first + n; b++) {
      s = t
      gsub(/XXXXXXXX/, sprintf("%08d", b), s)
      print s
    }
  }'
}

# pattern_check FILE BLOCKS SEED[,SEED...] [FIRST]: checks that each of blocks FIRST.. of FILE
# (a disk image or device) is block i of one of the SEEDs. Prints a per-seed count
# ("SEED=N ...") and returns 1 (listing up to 5 bad blocks) if any block is none of them.
# PATTERN_DD_FLAGS adds dd input flags (the guests read devices with "direct").
pattern_check() {
  dd if="$1" bs=262144 skip=$(( ${4:-0} * 4096 )) count=$(( $2 * 4096 )) \
    iflag=skip_bytes,count_bytes${PATTERN_DD_FLAGS:+,$PATTERN_DD_FLAGS} 2>/dev/null |
    awk -v seeds="$3" -v n="$2" -v first="${4:-0}" '
      BEGIN {
        ns = split(seeds, seed, ",")
        for (k = 1; k <= ns; k++) {
          unit = sprintf("%s block XXXXXXXX ", seed[k]); t = ""
          while (length(t) + length(unit) <= 4095) t = t unit
          while (length(t) < 4095) t = t "."
          tmpl[k] = t; count[k] = 0
        }
        bad = 0
      }
      {
        b = first + NR - 1; ok = 0
        for (k = 1; k <= ns && !ok; k++) {
          s = tmpl[k]; gsub(/XXXXXXXX/, sprintf("%08d", b), s)
          if ($0 == s) { count[k]++; ok = 1 }
        }
        if (!ok) {
          bad++
          if (bad <= 5) {
            # Where it first differs from the first seed block, and what is there instead.
            s = tmpl[1]; gsub(/XXXXXXXX/, sprintf("%08d", b), s)
            lo = 0; hi = length(s) + 1
            while (hi - lo > 1) { m = int((lo + hi) / 2); if (substr($0, 1, m) == substr(s, 1, m)) lo = m; else hi = m }
            got = substr($0, lo + 1, 32); want = substr(s, lo + 1, 32)
            gsub(/[^ -~]/, "?", got)
            printf "bad block %d: %d bytes, first difference at byte %d: got \"%s\", want \"%s\" (%s)\n", b, length($0) + 1, lo, got, want, seed[1]
          }
        }
      }
      END {
        if (NR != n) { printf "read %d blocks, wanted %d\n", NR, n; bad++ }
        out = ""
        for (k = 1; k <= ns; k++) out = out sprintf("%s=%d ", seed[k], count[k])
        print out "bad=" bad
        exit bad > 0
      }'
}

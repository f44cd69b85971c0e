#!/usr/bin/env bash
# Explore a LUNA16-layout data root with plain shell tools (no Python).
#
# Usage: scripts/explore_data.sh [DATA_ROOT]
#   DATA_ROOT defaults to $P2CH_DATA_ROOT, else data-unversioned/part2/luna.
#   Works on the real LUNA16 download and on `python -m p2ch.synth` output.
set -euo pipefail

usage() {
  echo "usage: $0 [DATA_ROOT]   (default: \$P2CH_DATA_ROOT or data-unversioned/part2/luna)"
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ "$#" -gt 1 ]; then usage >&2; exit 2; fi

root=${1:-${P2CH_DATA_ROOT:-data-unversioned/part2/luna}}
root=${root%/}
if [ ! -d "$root" ]; then
  echo "explore_data: $root does not exist; download LUNA16 there or run: python -m p2ch.synth --out $root" >&2
  exit 1
fi

shopt -s nullglob
subsets=("$root"/subset*/)
mhds=("$root"/subset*/*.mhd)
if [ "${#mhds[@]}" -eq 0 ]; then
  echo "explore_data: no .mhd files under $root/subset*/; download LUNA16 there or run: python -m p2ch.synth --out $root" >&2
  exit 1
fi

# LUNA16's CSVs may carry a UTF-8 BOM or CRLF line endings: strip both before reading.
clean() { sed -e '1s/^\xEF\xBB\xBF//' -e 's/\r$//' "$1"; }

# A CSV's records as tab-separated fields, unquoted ("a,b" is one field, "" inside quotes is a
# quote) and trimmed, as p2ch (pandas) reads them. POSIX awk (mawk, gawk, busybox): no FPAT.
# A quoted field that spans lines is not supported: the script says so on stderr.
fields() {
  clean "$1" | awk -v file="$1" '
    function trim(s) { sub(/^ +/, "", s); sub(/ +$/, "", s); return s }
    {
      s = $0; gsub(/\t/, " ", s)
      if (index(s, "\"") == 0) {
        gsub(/ *, */, "\t", s); print trim(s); next
      }
      out = ""; sep = ""
      while (1) {
        if (substr(s, 1, 1) == "\"") {
          s = substr(s, 2); f = ""
          while ((p = index(s, "\"")) > 0) {
            f = f substr(s, 1, p - 1)
            if (substr(s, p + 1, 1) != "\"") { s = substr(s, p + 1); break }
            f = f "\""; s = substr(s, p + 2)
          }
          if (p == 0 && !warned++) {
            printf "explore_data: %s line %d: a quoted field runs past the end of the line; counts may be wrong\n", file, NR | "cat 1>&2"
          }
          if (p == 0) { f = f s; s = "" }
        } else {
          f = ""
        }
        p = index(s, ",")
        if (p == 0) { out = out sep trim(f s); break }
        out = out sep trim(f substr(s, 1, p - 1)); sep = "\t"; s = substr(s, p + 1)
      }
      print out
    }'
}

# The non-empty values of column NAME (found by name in the header) of CSV file FILE, one a line.
column() {
  fields "$1" | awk -F '\t' -v file="$1" -v name="$2" '
    NR == 1 {
      for (i = 1; i <= NF; i++) if ($i == name) c = i
      if (!c) printf "explore_data: %s has no column %s; its counts are left out\n", file, name | "cat 1>&2"
      next
    }
    c && $c != "" { print $c }'
}

section() { printf '\n== %s\n' "$1"; }

# The first N lines. Unlike `head`, it reads its input to the end: with pipefail, a writer
# killed by SIGPIPE after head exits would fail the whole script on large files.
first() { awk -v n="$1" 'NR <= n'; }

section "CT files in $root"
printf '%-10s %6s %6s %10s\n' subset mhd raw size
for dir in "${subsets[@]}"; do
  name=$(basename "$dir")
  n_mhd=$(find "$dir" -maxdepth 1 -name '*.mhd' | wc -l)
  n_raw=$(find "$dir" -maxdepth 1 -name '*.raw' | wc -l)
  size=$(du -sh "$dir" | cut -f1)
  printf '%-10s %6d %6d %10s\n' "$name" "$n_mhd" "$n_raw" "$size"
done
echo "total CTs: ${#mhds[@]}"

candidates=""
for name in candidates.csv candidates_V2.csv; do
  if [ -f "$root/$name" ]; then candidates="$root/$name"; break; fi
done
annotations="$root/annotations.csv"

section "CSV files (data rows, excluding the header)"
for csv in "$root"/*.csv; do
  skip=1
  if [ "$(basename "$csv")" = seriesuids.csv ]; then skip=0; fi  # LUNA16's seriesuids.csv has no header
  rows=$(clean "$csv" | awk -v skip="$skip" 'NR > skip && NF' | wc -l)
  printf '%-28s %9d\n' "$(basename "$csv")" "$rows"
done

for csv in "$annotations" "$candidates"; do
  if [ -n "$csv" ] && [ -f "$csv" ]; then
    section "first rows of $(basename "$csv")"
    clean "$csv" | first 4
  fi
done

if [ -n "$candidates" ]; then
  section "candidates by class ($(basename "$candidates"))"
  column "$candidates" class | awk '{ n[$1 + 0]++ }
    END {
      pos = n["1"] + 0; neg = n["0"] + 0
      printf "positive (class 1): %d\nnegative (class 0): %d\n", pos, neg
      if (pos > 0) printf "negatives per positive: %.1f\n", neg / pos
    }'

  section "candidates per series (top 10)"
  column "$candidates" seriesuid | sort | uniq -c | sort -k1,1nr -k2 | first 10
  column "$candidates" seriesuid | sort -u | wc -l | awk '{ print "series with candidates: " $1 }'
else
  echo "no candidates.csv or candidates_V2.csv in $root" >&2
fi

if [ -f "$annotations" ]; then
  section "annotation diameters (mm)"
  column "$annotations" diameter_mm | sort -g | awk '
    { d[NR] = $1 }
    END {
      if (NR == 0) { print "no annotations"; exit }
      median = (NR % 2) ? d[(NR + 1) / 2] : (d[NR / 2] + d[NR / 2 + 1]) / 2
      printf "count %d  min %.2f  median %.2f  max %.2f\n", NR, d[1], median, d[NR]
      split("3 5 10 20 30", edge, " ")
      for (i = 1; i <= NR; i++) {
        b = 6
        for (k = 1; k <= 5; k++) if (d[i] < edge[k]) { b = k; break }
        bin[b]++
      }
      label[1] = "    < 3"; label[2] = "  3 - 5"; label[3] = " 5 - 10"
      label[4] = "10 - 20"; label[5] = "20 - 30"; label[6] = "  >= 30"
      for (b = 1; b <= 6; b++) {
        bar = ""; for (j = 0; j < bin[b] * 50 / NR; j++) bar = bar "#"
        printf "%s mm %6d %s\n", label[b], bin[b] + 0, bar
      }
    }'
  column "$annotations" seriesuid | sort -u | wc -l | awk '{ print "series with nodules: " $1 }'
fi

section "series named in the CSVs but missing on disk"
on_disk=$(mktemp)
named=$(mktemp)
trap 'rm -f "$on_disk" "$named"' EXIT
for mhd in "${mhds[@]}"; do basename "$mhd" .mhd; done | sort -u > "$on_disk"
for csv in "$candidates" "$annotations"; do
  if [ -n "$csv" ] && [ -f "$csv" ]; then column "$csv" seriesuid; fi
done | sort -u > "$named"
missing=$(comm -23 "$named" "$on_disk" | wc -l)
echo "named in CSVs: $(wc -l < "$named")  on disk: $(wc -l < "$on_disk")  missing on disk: $missing"
comm -23 "$named" "$on_disk" | first 5 | sed 's/^/  /'
if [ "$missing" -gt 5 ]; then echo "  … and $((missing - 5)) more (download the other subsets to use them)"; fi

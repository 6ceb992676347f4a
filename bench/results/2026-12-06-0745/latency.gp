set terminal pngcairo size 900,560 font 'sans,10'
set output 'latency.png'
set title 'Snapshot and fork latency (p99) against VDI size'
set xlabel 'VDI size (GiB)'
set ylabel 'p99 latency (µs)'
set key outside below
set grid
set logscale x 2
set logscale y 10
plot 'latency-0.dat' using 1:2 with linespoints lw 2 title 'fork p99, idle (disk)', 'latency-1.dat' using 1:2 with linespoints lw 2 title 'fork p99, idle (tmpfs)', 'latency-2.dat' using 1:2 with linespoints lw 2 title 'fork p99, live (disk)', 'latency-3.dat' using 1:2 with linespoints lw 2 title 'fork p99, live (tmpfs)', 'latency-4.dat' using 1:2 with linespoints lw 2 title 'snapshot p99, idle (disk)', 'latency-5.dat' using 1:2 with linespoints lw 2 title 'snapshot p99, idle (tmpfs)', 'latency-6.dat' using 1:2 with linespoints lw 2 title 'snapshot p99, live (disk)', 'latency-7.dat' using 1:2 with linespoints lw 2 title 'snapshot p99, live (tmpfs)'

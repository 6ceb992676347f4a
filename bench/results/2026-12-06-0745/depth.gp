set terminal pngcairo size 900,560 font 'sans,10'
set output 'depth.png'
set title 'Random 4K reads against snapshot depth'
set xlabel 'snapshot / backing-chain depth'
set ylabel 'IOPS (median)'
set key outside below
set grid
set logscale x 10
plot 'depth-0.dat' using 1:2 with linespoints lw 2 title 'parallax (disk)', 'depth-1.dat' using 1:2 with linespoints lw 2 title 'parallax (tmpfs)', 'depth-2.dat' using 1:2 with linespoints lw 2 title 'qcow2 writeback (disk)', 'depth-3.dat' using 1:2 with linespoints lw 2 title 'qcow2 writeback (tmpfs)'

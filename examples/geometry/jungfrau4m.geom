; CrystFEL geometry written by peaknet-pva
; 8 panel(s), slab 4096 x 1024 (ss x fs)
; peaks: peakXPosRaw = fs, peakYPosRaw = ss in the slab, pixel centre at the integer
; (indexamajig --peaks=cxi adds the half pixel itself)

photon_energy = /LCLS/photon_energy_eV
; clen in metres
clen = 0.12
; res in pixels per metre (1 / pixel size)
res = 13333.333333333334
adu_per_eV = 0.001

data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi

p0/min_fs = 0
p0/max_fs = 1023
p0/min_ss = 0
p0/max_ss = 511
p0/fs = +1.0x
p0/ss = +1.0y
p0/corner_x = -1034.6
p0/corner_y = -1078.3

p1/min_fs = 0
p1/max_fs = 1023
p1/min_ss = 512
p1/max_ss = 1023
p1/fs = +1.0x
p1/ss = +1.0y
p1/corner_x = 5.400000000000091
p1/corner_y = -1078.3

p2/min_fs = 0
p2/max_fs = 1023
p2/min_ss = 1024
p2/max_ss = 1535
p2/fs = +1.0x
p2/ss = +1.0y
p2/corner_x = -1034.6
p2/corner_y = -530.3

p3/min_fs = 0
p3/max_fs = 1023
p3/min_ss = 1536
p3/max_ss = 2047
p3/fs = +1.0x
p3/ss = +1.0y
p3/corner_x = 5.400000000000091
p3/corner_y = -530.3

p4/min_fs = 0
p4/max_fs = 1023
p4/min_ss = 2048
p4/max_ss = 2559
p4/fs = +1.0x
p4/ss = +1.0y
p4/corner_x = -1034.6
p4/corner_y = 21.700000000000045

p5/min_fs = 0
p5/max_fs = 1023
p5/min_ss = 2560
p5/max_ss = 3071
p5/fs = +1.0x
p5/ss = +1.0y
p5/corner_x = 5.400000000000091
p5/corner_y = 21.700000000000045

p6/min_fs = 0
p6/max_fs = 1023
p6/min_ss = 3072
p6/max_ss = 3583
p6/fs = +1.0x
p6/ss = +1.0y
p6/corner_x = -1034.6
p6/corner_y = 569.7

p7/min_fs = 0
p7/max_fs = 1023
p7/min_ss = 3584
p7/max_ss = 4095
p7/fs = +1.0x
p7/ss = +1.0y
p7/corner_x = 5.400000000000091
p7/corner_y = 569.7

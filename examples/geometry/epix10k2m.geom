; CrystFEL geometry written by peaknet-pva
; 16 panel(s), slab 5632 x 384 (ss x fs)
; peaks: peakXPosRaw = fs, peakYPosRaw = ss in the slab, pixel centre at the integer
; (indexamajig --peaks=cxi adds the half pixel itself)

photon_energy = /LCLS/photon_energy_eV
; clen in metres
clen = 0.09
; res in pixels per metre (1 / pixel size)
res = 10000.0
adu_per_photon = 1.0

data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi

p0/min_fs = 0
p0/max_fs = 383
p0/min_ss = 0
p0/max_ss = 351
p0/fs = +1.0x
p0/ss = +1.0y
p0/corner_x = -800.8
p0/corner_y = -742.4

p1/min_fs = 0
p1/max_fs = 383
p1/min_ss = 352
p1/max_ss = 703
p1/fs = +1.0x
p1/ss = +1.0y
p1/corner_x = -396.79999999999995
p1/corner_y = -742.4

p2/min_fs = 0
p2/max_fs = 383
p2/min_ss = 704
p2/max_ss = 1055
p2/fs = +1.0x
p2/ss = +1.0y
p2/corner_x = 17.200000000000045
p2/corner_y = -742.4

p3/min_fs = 0
p3/max_fs = 383
p3/min_ss = 1056
p3/max_ss = 1407
p3/fs = +1.0x
p3/ss = +1.0y
p3/corner_x = 421.20000000000005
p3/corner_y = -742.4

p4/min_fs = 0
p4/max_fs = 383
p4/min_ss = 1408
p4/max_ss = 1759
p4/fs = +1.0x
p4/ss = +1.0y
p4/corner_x = -800.8
p4/corner_y = -370.4

p5/min_fs = 0
p5/max_fs = 383
p5/min_ss = 1760
p5/max_ss = 2111
p5/fs = +1.0x
p5/ss = +1.0y
p5/corner_x = -396.79999999999995
p5/corner_y = -370.4

p6/min_fs = 0
p6/max_fs = 383
p6/min_ss = 2112
p6/max_ss = 2463
p6/fs = +1.0x
p6/ss = +1.0y
p6/corner_x = 17.200000000000045
p6/corner_y = -370.4

p7/min_fs = 0
p7/max_fs = 383
p7/min_ss = 2464
p7/max_ss = 2815
p7/fs = +1.0x
p7/ss = +1.0y
p7/corner_x = 421.20000000000005
p7/corner_y = -370.4

p8/min_fs = 0
p8/max_fs = 383
p8/min_ss = 2816
p8/max_ss = 3167
p8/fs = +1.0x
p8/ss = +1.0y
p8/corner_x = -800.8
p8/corner_y = 11.600000000000023

p9/min_fs = 0
p9/max_fs = 383
p9/min_ss = 3168
p9/max_ss = 3519
p9/fs = +1.0x
p9/ss = +1.0y
p9/corner_x = -396.79999999999995
p9/corner_y = 11.600000000000023

p10/min_fs = 0
p10/max_fs = 383
p10/min_ss = 3520
p10/max_ss = 3871
p10/fs = +1.0x
p10/ss = +1.0y
p10/corner_x = 17.200000000000045
p10/corner_y = 11.600000000000023

p11/min_fs = 0
p11/max_fs = 383
p11/min_ss = 3872
p11/max_ss = 4223
p11/fs = +1.0x
p11/ss = +1.0y
p11/corner_x = 421.20000000000005
p11/corner_y = 11.600000000000023

p12/min_fs = 0
p12/max_fs = 383
p12/min_ss = 4224
p12/max_ss = 4575
p12/fs = +1.0x
p12/ss = +1.0y
p12/corner_x = -800.8
p12/corner_y = 383.6

p13/min_fs = 0
p13/max_fs = 383
p13/min_ss = 4576
p13/max_ss = 4927
p13/fs = +1.0x
p13/ss = +1.0y
p13/corner_x = -396.79999999999995
p13/corner_y = 383.6

p14/min_fs = 0
p14/max_fs = 383
p14/min_ss = 4928
p14/max_ss = 5279
p14/fs = +1.0x
p14/ss = +1.0y
p14/corner_x = 17.200000000000045
p14/corner_y = 383.6

p15/min_fs = 0
p15/max_fs = 383
p15/min_ss = 5280
p15/max_ss = 5631
p15/fs = +1.0x
p15/ss = +1.0y
p15/corner_x = 421.20000000000005
p15/corner_y = 383.6

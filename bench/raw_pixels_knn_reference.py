"""Float64 NumPy transcription of bench/raw_pixels_knn.ts (raw-pixel kNN on Fashion-MNIST: centred by the
training mean image, L2-normalised, cosine, k 200, votes exp(sim / 0.1)). Run: /usr/bin/python3 bench/raw_pixels_knn_reference.py"""
import numpy as np, gzip, os, struct
d='/usr/share/datasets/fashion-mnist'
def load(prefix):
    fs=os.listdir(d)
    def find(key):
        return [f for f in fs if f.startswith(prefix) and key in f][0]
    def rd(f):
        b=open(os.path.join(d,f),'rb').read()
        if f.endswith('.gz'): b=gzip.decompress(b)
        return b
    img=rd(find('images')); lab=rd(find('labels'))
    n=struct.unpack('>I',img[4:8])[0]
    X=np.frombuffer(img,dtype=np.uint8,offset=16).reshape(n,-1).astype(np.float64)/255
    y=np.frombuffer(lab,dtype=np.uint8,offset=8).astype(np.int64)
    return X,y
Xtr,ytr=load('train'); Xte,yte=load('t10k')
m=Xtr.mean(0); A=Xtr-m; B=Xte-m
A/=np.linalg.norm(A,axis=1,keepdims=True); B/=np.linalg.norm(B,axis=1,keepdims=True)
correct=0
for s in range(0,len(B),500):
    S=B[s:s+500]@A.T
    idx=np.argpartition(-S,200,axis=1)[:,:200]
    v=np.take_along_axis(S,idx,1); w=np.exp(v/0.1)
    votes=np.zeros((len(S),10))
    for c in range(10): votes[:,c]=(w*(ytr[idx]==c)).sum(1)
    correct+=(votes.argmax(1)==yte[s:s+500]).sum()
print('numpy float64 raw-pixel kNN centred top1', correct/len(B))

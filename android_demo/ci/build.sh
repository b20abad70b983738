#!/usr/bin/env bash
# Build and test the Android demo without Gradle or the Android SDK download:
#
#   android_demo/ci/build.sh core-test   JUnit tests of the plain-Java core
#   android_demo/ci/build.sh apk         debug APK: aapt2 → javac → dx → zipalign → apksigner, then verify
#
# Tools come from Debian: bookworm packages (aapt, zipalign, apksigner, junit4) are installed with
# apt when missing and we are root; android.jar (API 23) and the dx dexer come from bullseye with a
# private apt state under android_demo/build/ (the system's sources are not touched).
# Exit status 3 = a tool could not be obtained (the message says which); anything else non-zero = failure.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BUILD="$HERE/build"
PYTHON="${PYTHON:-python3}"
JAVAC_FLAGS=(-source 8 -target 8 -Xlint:-options -encoding UTF-8)
mkdir -p "$BUILD"

unavailable() { echo "SKIP: $*" >&2; exit 3; }

need_bookworm_tools() {
    local missing=()
    command -v javac >/dev/null || unavailable "javac (a JDK) is not installed"
    for tool in aapt aapt2 zipalign apksigner; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    [ -f /usr/share/java/junit4.jar ] || missing+=(junit4)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        unavailable "missing ${missing[*]}; install: apt-get install aapt zipalign apksigner junit4 libhamcrest-java"
    fi
    echo "installing Debian packages: aapt zipalign apksigner junit4 libhamcrest-java" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends aapt zipalign apksigner junit4 libhamcrest-java \
        > "$BUILD/apt-install.log" 2>&1 \
        || { apt-get update -q > "$BUILD/apt-update.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
             aapt zipalign apksigner junit4 libhamcrest-java >> "$BUILD/apt-install.log" 2>&1; } \
        || unavailable "apt-get could not install the build tools (see $BUILD/apt-install.log)"
}

SDK="$BUILD/sdk"
ANDROID_JAR="$SDK/usr/share/java/com.android.android-23.jar"
DX_JAR="$SDK/usr/share/java/com.android.dx-10.0.0.jar"

need_bullseye_sdk() {
    [ -f "$ANDROID_JAR" ] && [ -f "$DX_JAR" ] && return 0
    command -v apt-get >/dev/null || unavailable "no apt-get to fetch android.jar and dx from Debian bullseye"
    local state="$BUILD/apt-bullseye"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs" "$SDK"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main" > "$state/sources.list"
    local opts=(-o Dir::Etc::SourceList="$state/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$state/lists"
                -o Dir::Cache="$state/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)
    apt-get "${opts[@]}" update > "$state/update.log" 2>&1 || unavailable "cannot reach Debian bullseye for libandroid-23-java/dalvik-exchange (see $state/update.log)"
    (cd "$state/debs" && apt-get "${opts[@]}" download libandroid-23-java dalvik-exchange > "$state/download.log" 2>&1) \
        || unavailable "cannot download libandroid-23-java/dalvik-exchange from bullseye (see $state/download.log)"
    for deb in "$state"/debs/*.deb; do dpkg -x "$deb" "$SDK"; done
    [ -f "$ANDROID_JAR" ] && [ -f "$DX_JAR" ] || unavailable "bullseye packages did not contain android-23.jar / dx"
}

core_test() {
    need_bookworm_tools
    local out="$BUILD/core-test"
    rm -rf "$out" && mkdir -p "$out/main" "$out/test"
    javac "${JAVAC_FLAGS[@]}" -d "$out/main" $(find "$HERE/core/src/main/java" -name '*.java')
    local cp="$out/main:/usr/share/java/junit4.jar:/usr/share/java/hamcrest-core.jar"
    javac "${JAVAC_FLAGS[@]}" -cp "$cp" -d "$out/test" $(find "$HERE/core/src/test/java" -name '*.java')
    local classes
    classes=$(cd "$HERE/core/src/test/java" && find . -name '*Test.java' | sed 's|^\./||; s|\.java$||; s|/|.|g' | sort)
    java -Dquantface.repo="$REPO" -cp "$cp:$out/test" org.junit.runner.JUnitCore $classes
}

apk() {
    need_bookworm_tools
    need_bullseye_sdk
    local out="$BUILD/apk"
    rm -rf "$out" && mkdir -p "$out/stubs" "$out/classes" "$out/assets"
    # 1. compile: stubs (compile-only), then core + app against android.jar
    javac "${JAVAC_FLAGS[@]}" -bootclasspath "$ANDROID_JAR" -d "$out/stubs" $(find "$HERE/stubs/src" -name '*.java')
    javac "${JAVAC_FLAGS[@]}" -bootclasspath "$ANDROID_JAR" -cp "$out/stubs" -d "$out/classes" \
        $(find "$HERE/core/src/main/java" "$HERE/app/src/main/java" -name '*.java')
    # 2. resources + manifest + assets (the model must stay uncompressed: LiteRT memory-maps it)
    local model="${QF_DEMO_MODEL:-$HERE/core/src/test/resources/golden/model.tflite}"
    cp "$model" "$out/assets/model.tflite"
    local table="${model%.tflite}.precision.json"
    [ -f "$table" ] && cp "$table" "$out/assets/model.precision.json"
    aapt2 compile --dir "$HERE/app/src/main/res" -o "$out/res.zip"
    aapt2 link -o "$out/unsigned.apk" -I "$ANDROID_JAR" --manifest "$HERE/app/src/main/AndroidManifest.xml" \
        -A "$out/assets" -0 .tflite --min-sdk-version 23 --target-sdk-version 23 "$out/res.zip"
    # 3. dex our classes only (the stubs are on the compile classpath, never dexed)
    java -jar "$DX_JAR" --dex --min-sdk-version=23 --output="$out/classes.dex" "$out/classes"
    "$PYTHON" "$HERE/ci/apk_tools.py" add-dex "$out/unsigned.apk" "$out/classes.dex"
    # 4. align, sign with a throwaway debug key
    zipalign -f -p 4 "$out/unsigned.apk" "$out/aligned.apk"
    [ -f "$BUILD/debug.keystore" ] || keytool -genkeypair -keystore "$BUILD/debug.keystore" -storepass android -keypass android \
        -alias androiddebugkey -dname "CN=Android Debug,O=Android,C=US" -keyalg RSA -keysize 2048 -validity 10000 >/dev/null 2>&1
    local apk_path="$BUILD/quantface-demo-debug.apk"
    apksigner sign --ks "$BUILD/debug.keystore" --ks-pass pass:android --key-pass pass:android --out "$apk_path" "$out/aligned.apk"
    # 5. verify
    apksigner verify --verbose "$apk_path" | tee "$out/apksigner.txt"
    zipalign -c -p 4 "$apk_path"
    aapt dump badging "$apk_path" | tee "$out/badging.txt" | head -5
    grep -q "package: name='org.quantface.demo'" "$out/badging.txt"
    grep -q "sdkVersion:'23'" "$out/badging.txt"
    grep -q "launchable-activity: name='org.quantface.demo.MainActivity'" "$out/badging.txt"
    "$PYTHON" "$HERE/ci/apk_tools.py" check "$apk_path" --stored assets/model.tflite --forbid org.tensorflow.lite \
        --require org.quantface.demo.MainActivity --require org.quantface.demo.LiteRtRestorer --require org.quantface.core.ModelIO \
        > "$out/check.json"
    echo "built and verified $apk_path ($(stat -c %s "$apk_path") bytes)"
}

case "${1:-}" in
    core-test) core_test ;;
    apk) apk ;;
    *) echo "usage: $0 core-test|apk" >&2; exit 2 ;;
esac
